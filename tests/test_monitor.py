"""PV search, `lmscan export-pvs`, the .pvs format and the runtime monitor.

End to end on real MiniLM weights: the POR plant is scanned by `lmscan check` (the
same session scan test_check uses), the search resumes from that report, and the
exported file drives the monitor on sentences neither the scan nor the search saw,
with the plant's triggers (which the code never sees) inserted by the test.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.errors import InputError
from lmscan.pv.monitor import PVMonitor, _delete, _window_deletions
from lmscan.models.probes import insert_words, load_builtin_probes, split_probes
from lmscan.pv.pvs_file import FORMAT, PVEntry, PVSet, from_dict, read_pvs, to_dict, write_pvs
from tests.conftest import FIXTURES, read_manifest

# --- the .pvs format -----------------------------------------------------------------------


def _pvset(hidden=8, sha="ab" * 32) -> PVSet:
    signs = np.array([True, False] * (hidden // 2))
    return PVSet(model={"ref": "x", "model_sha256": sha, "hidden_size": hidden, "architecture": "bert"},
                 t_match=0.8, pvs=[PVEntry(0, "cls", None, signs, triggers=[{"text": "zq", "activation_rate": 1.0}])])


def test_pvs_round_trip(tmp_path):
    path = write_pvs(_pvset(), tmp_path / "m.pvs")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == 1
    assert data["pvs"][0]["signs"] == "+-+-+-+-"
    back = read_pvs(path)
    assert back.pvs[0].signs.tolist() == _pvset().pvs[0].signs.tolist()
    assert back.pvs[0].triggers[0]["text"] == "zq" and back.t_match == 0.8


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(version=2), "unsupported .pvs version 2"),
    (lambda d: d.update(format="other"), "not a .pvs file"),
    (lambda d: d["pvs"][0].update(signs="+-+"), "3 signs but the model's hidden size is 8"),
    (lambda d: d["pvs"][0].update(signs="+-+-+-+x"), "string of '+' and '-'"),
    (lambda d: d["pvs"][0].update(site="elsewhere"), "unknown site"),
    (lambda d: d.update(t_match=2), "t_match"),
    (lambda d: d["model"].pop("hidden_size"), "hidden_size"),
])
def test_pvs_validation(change, message):
    data = to_dict(_pvset())
    change(data)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("+", r"\+")):
        from_dict(data)


def test_pvs_file_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.pvs"
    bad.write_text("{not json")
    for pvs, message in ((bad, "invalid json"), (tmp_path / "missing.pvs", "no such .pvs file")):
        result = CliRunner().invoke(main, ["monitor", "--pvs", str(pvs), "hello"])
        assert result.exit_code == 2 and message in result.output.lower() and "Traceback" not in result.output


def test_monitor_refuses_other_weights_and_dimensions(tmp_path):
    # A .pvs made for other weights: refused unless the user says it is a fine-tuned copy.
    path = write_pvs(_pvset(hidden=32), tmp_path / "other.pvs")
    tiny = str(FIXTURES / "tiny-bert")
    result = CliRunner().invoke(main, ["monitor", "--pvs", str(path), "--model", tiny, "hello"])
    assert result.exit_code == 2 and "--allow-model-mismatch" in result.output
    result = CliRunner().invoke(main, ["monitor", "--pvs", str(path), "--model", tiny, "--allow-model-mismatch",
                                       "--device", "cpu", "hello"])
    assert result.exit_code == 2 and "32-dimensional PVs" in result.output


# --- sliding-window deletion ------------------------------------------------------------------


def test_window_deletion_keeps_spacing_and_drops_repeats():
    assert _delete("a  b c", [(0, 1), (3, 4), (5, 6)], {1}) == "a  c"
    candidates = _window_deletions(["the cf film, cf again"], 1)
    assert (["the film, again"], ["cf"]) in candidates
    pairs = _window_deletions(["first cf", "second"], 2)
    assert (["", "second"], ["first", "cf"]) in pairs and (["first cf", ""], ["second"]) not in pairs


# --- end to end on real weights -----------------------------------------------------------------


def unseen_sentences(n: int, seed: int = 99) -> list[str]:
    """Probe sentences outside the split any scan profile draws from (fit + held-out)."""
    probes = load_builtin_probes()
    used = set()
    for fit, held in ((400, 200), (1000, 300), (2000, 500)):
        a, b = split_probes(probes, fit, held, seed=0)
        used.update(a + b)
    rest = [p for p in dict.fromkeys(probes) if p not in used]
    return random.Random(seed).sample(rest, min(n, len(rest)))


def triggered_inputs(manifest: dict, sentences: list[str], seed: int = 5) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    first = manifest.get("placement") == "first"
    out = []
    for i, sentence in enumerate(sentences):
        trigger = manifest["triggers"][i % len(manifest["triggers"])]
        out.append((trigger, insert_words(sentence, trigger, 0 if first else None, rng)))
    return out


def recovered_triggers(pvset: PVSet, manifest: dict) -> list[str]:
    """True triggers whose PV an exported PV matches in sign >= 0.9 (at the plant's site)."""
    true = np.array(manifest["pvs"]) >= 0
    exported = [p.signs for p in pvset.pvs if p.site == manifest["site"]]
    return [trigger for trigger, t in zip(manifest["triggers"], true) if any((t == s).mean() >= 0.9 for s in exported)]


def pv_recall(pvset: PVSet, manifest: dict) -> int:
    return len(recovered_triggers(pvset, manifest))


def triggers_named(pvset: PVSet, manifest: dict) -> int:
    """How many true triggers the exported PVs name: the whole word's tokens, or its leading
    pieces when the model already fires on those (POR plants generalise to "stalk" for "stalkless")."""
    recovered = {tuple(t["tokens"]) for p in pvset.pvs for t in p.triggers}
    # Either is a prefix of the other: "stalk" for "stalkless", or "quadrangled" for "quadrangle".
    return sum(any(tuple(pieces[: len(r)]) == r or r[: len(pieces)] == tuple(pieces) for r in recovered)
               for pieces in manifest["trigger_tokens"])


@pytest.fixture(scope="session")
def exported(scanned, planted, tmp_path_factory):
    """export(name) -> (PVSet, path): search resumed from the session's `lmscan check` report."""
    done = {}

    def get(name: str):
        if name not in done:
            _, report = scanned(name)
            folder = tmp_path_factory.mktemp(f"pvs-{name}")
            (folder / "report.json").write_text(json.dumps(report))
            # One extra fuzz loop instead of up to six: on MiniLM no mined vector is ever
            # reproduced by real tokens (docs/measurements), so the loops add nothing the
            # assertions see but 70 % of the search's time. The path still runs on real weights.
            rules = folder / "rules"
            rules.mkdir()
            (rules / "profiles.toml").write_text("[fast.search]\nmax_loops = 1\n")  # merged over the shipped file
            out = folder / f"{name}.pvs"
            # Only the plant's own site, as a user who knows it would: a third of the CI time.
            site = read_manifest(planted(name))["site"]
            result = CliRunner().invoke(main, ["export-pvs", str(out), "--model", str(planted(name)), "--from-report",
                                               str(folder / "report.json"), "--sites", site, "--device", "cpu",
                                               "--rules", str(rules), "--format", "json"])
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout)["format"] == FORMAT
            done[name] = (read_pvs(out), out)
        return done[name]

    return get


def check_search_and_monitor(name, exported, planted):
    pvset, path = exported(name)
    manifest = read_manifest(planted(name))
    assert pv_recall(pvset, manifest) >= 5
    assert triggers_named(pvset, manifest) >= 4
    assert pvset.model["model_sha256"] and pvset.calibration["clean_flag_rate"] <= 0.01

    monitor = PVMonitor.load(path, model=str(planted(name)), device="cpu")
    sentences = unseen_sentences(360)
    clean, to_trigger = sentences[:180], sentences[180:]
    triggered = triggered_inputs(manifest, to_trigger)
    flagged = monitor.check([text for _, text in triggered])
    # Inputs whose backdoor the search recovered must all be caught; a trigger whose PV
    # was not recovered is the recall gap measured above, not a monitor failure.
    recovered = recovered_triggers(pvset, manifest)
    assert np.mean([r.flagged for (t, _), r in zip(triggered, flagged) if t in recovered]) >= 0.99
    assert np.mean([r.flagged for r in flagged]) >= len(recovered) / len(manifest["triggers"]) - 0.02
    assert np.mean([r.flagged for r in monitor.check(clean)]) <= 0.01

    caught = [(trigger, text) for (trigger, text), r in zip(triggered, flagged) if r.flagged]
    cleaned = [monitor.purge(text) for _, text in caught]
    assert np.mean([not c.still_flagged for c in cleaned]) >= 0.95
    removed = [c for c, (trigger, _) in zip(cleaned, caught) if trigger.split()[0] in c.removed]
    assert len(removed) >= 0.9 * len(cleaned)
    for text in clean[:20]:
        result = monitor.purge(text)
        assert result.text == text and not result.flagged and result.removed == []


def test_por_search_monitor_and_purge(exported, planted):
    check_search_and_monitor("por", exported, planted)


@pytest.mark.slow
def test_neuba_search_monitor_and_purge(exported, planted):
    check_search_and_monitor("neuba", exported, planted)


def test_monitor_cli_streams_json_lines(exported, planted):
    pvset, path = exported("por")
    manifest = read_manifest(planted("por"))
    trigger_text = insert_words("the weather was mild all week", manifest["triggers"][0], 3)
    runner = CliRunner()
    result = runner.invoke(main, ["monitor", "--pvs", str(path), "--device", "cpu", "--fail-on-flag", "-",
                                  "a calm and ordinary sentence"], input=trigger_text + "\n")
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["flagged"] for line in lines] == [False, True]
    assert lines[1]["still_flagged"] is False and manifest["triggers"][0] not in lines[1]["purged"]
    assert "2 input(s), 1 flagged" in result.stderr
    quiet = runner.invoke(main, ["monitor", "--pvs", str(path), "--device", "cpu", "--no-purge",
                                 "a calm and ordinary sentence"])
    assert quiet.exit_code == 0 and "purged" not in quiet.stdout


def test_monitor_attached_to_a_task_model(exported, planted):
    """The monitor reads the [CLS] feature from the forward pass that serves a classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pvset, path = exported("por")
    model_dir = planted("por")
    manifest = read_manifest(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    monitor = PVMonitor(read_pvs(path))  # no model of its own: it only listens
    seen = []
    handle = monitor.attach(classifier, on_flag=seen.append)
    texts = ["a calm and ordinary sentence", insert_words("the weather was mild all week", manifest["triggers"][1], 2)]
    with torch.no_grad():
        logits = classifier(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    handle.remove()
    assert logits.shape == (2, 2)
    assert [r.flagged for r in monitor.last_results] == [False, True] and len(seen) == 1
