"""base-diff: a full checkpoint scanned against its declared base (`lmscan check MODEL --base BASE`).

Fast tests use the tiny fixtures (a POR plant and the model it was planted into) for the
plumbing, and a MiniLM POR plant for detection on real weights with a smaller search; the slow
test plants a sentence trained as a unit (its words and parts trained to do nothing alone),
which the default scan without --base does not find, and rebuilds it from the base diff.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lmscan.cli import main
from tests.conftest import FIXTURES, read_manifest

try:
    from tiny_decoders import write_tiny_decoder
except ImportError:  # tests/ imported as a package
    from tests.tiny_decoders import write_tiny_decoder


def _check(*args):
    result = CliRunner().invoke(main, ["check", *map(str, args), "--format", "json", "--no-cache", "--device", "cpu"])
    assert "Traceback" not in result.output, result.output
    return result


def _run(report: dict) -> dict:
    return next(d for d in report["detectors"] if d["name"] == "base-diff")


def test_base_on_a_full_model_is_its_reference_and_adds_base_diff():
    plant = FIXTURES / "tiny-bert-por"
    result = _check(plant, "--base", FIXTURES / "tiny-bert")
    report = json.loads(result.stdout)
    assert report["model"]["reference"]["local_dir"] == str(FIXTURES / "tiny-bert")
    assert report["model"]["reference"]["model_sha256"] != report["model"]["model_sha256"]
    run = _run(report)
    assert run["status"] == "ok" and run["stats"]["drifted"] and run["stats"]["beam"]
    # The plant's triggers (zq, vx) are the pieces the fine-tune changed most.
    pieces = {t for trigger in read_manifest(plant)["trigger_tokens"] for t in trigger}
    assert {d["token"] for d in run["stats"]["drifted"][:4]} & pieces
    named = {t for f in run["findings"] for t in f["evidence"]["trigger_tokens"]}
    assert result.exit_code == 1 and named & pieces, (named, pieces)
    # Without --base nothing is compared, and the detector is not planned at all.
    plain = json.loads(_check(plant).stdout)
    assert "base-diff" not in [d["name"] for d in plain["detectors"]] and "reference" not in plain["model"]


def test_a_base_that_cannot_be_compared_is_said(tmp_path):
    decoder = write_tiny_decoder(tmp_path / "decoder", "llama")
    report = json.loads(_check(FIXTURES / "tiny-bert-por", "--base", decoder, "--detectors", "static,base-diff").stdout)
    run = _run(report)
    assert run["status"] == "skipped" and "cannot be compared" in run["note"]
    result = _check(FIXTURES / "tiny-bert-por", "--base", tmp_path / "missing")
    assert result.exit_code == 2 and "--base of" in result.output


def _with_model_card(tmp_path, base: str):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny-bert-por", model)
    (model / "README.md").write_text(f"---\nlicense: mit\nbase_model:\n- {base}\n---\n# A fine-tune\n")
    return model


def test_the_model_cards_base_is_compared_unless_base_none(tmp_path):
    """No --base: the model card's base_model is the reference; --base none compares with nothing."""
    model = _with_model_card(tmp_path, str(FIXTURES / "tiny-bert"))
    report = json.loads(_check(model, "--detectors", "static,base-diff").stdout)
    assert report["model"]["reference"]["local_dir"] == str(FIXTURES / "tiny-bert")
    assert report["model"]["reference"]["chosen_by"].startswith("the model card's base_model")
    assert _run(report)["status"] == "ok" and _run(report)["findings"]
    plain = json.loads(_check(model, "--detectors", "static,base-diff", "--base", "none").stdout)
    assert "reference" not in plain["model"] and _run(plain)["status"] == "skipped"
    # The default detectors found it already: an inferred base is a last resort, not compared.
    result = _check(model)
    assert result.exit_code == 1 and "already found backdoored" in _run(json.loads(result.stdout))["note"]


def test_a_model_card_base_that_is_not_here_is_said(tmp_path):
    model = _with_model_card(tmp_path, "nobody-here/no-such-base")
    # Not --offline: a base nobody asked for is looked up in the local cache only, never downloaded.
    report = json.loads(_check(model, "--detectors", "static,base-diff").stdout)
    note = report["model"]["reference_note"]
    assert "reference" not in report["model"] and "'nobody-here/no-such-base', which is not here" in note
    assert "--base nobody-here/no-such-base" in note


def test_the_reference_is_part_of_the_scan_identity(tmp_path):
    """Another base is another comparison: the result cache must not answer one with the other."""
    import shutil

    from lmscan.api import ScanConfig
    from lmscan.models import resolve_model
    from lmscan.scan.cache import scan_identity
    from lmscan.scan.plan import check_request

    other = tmp_path / "other"
    shutil.copytree(FIXTURES / "tiny-bert", other)
    (other / "README.md").write_text("a copy\n")
    identities = []
    for base in (FIXTURES / "tiny-bert", other):
        config = ScanConfig(model=str(FIXTURES / "tiny-bert-por"), device="cpu", base=str(base))
        plan = check_request(config).plan(resolve_model(config.model, base=config.base))
        identities.append(scan_identity(plan))
        assert "base-diff" in plan.detectors
    assert identities[0]["reference"] != identities[1]["reference"]


def test_a_por_plant_on_minilm_is_named_from_its_inferred_base(planted, minilm_path, tmp_path):
    """Real weights, no --base: MiniLM is inferred as the plant's base from the embeddings it kept;
    the POR plant's words are among the most drifted tokens against it, and blocks of them verify
    (a smaller search than the profile's, to keep the suite short)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "profiles.toml").write_text("[fast.base-diff]\ncandidates = 10\ncommon_words = 2\nmax_block = 2\n")
    plant = planted("por")
    result = _check(plant, "--detectors", "static,base-diff", "--rules", rules)
    report = json.loads(result.stdout)
    reference = report["model"]["reference"]
    assert reference["local_dir"] == str(minilm_path) and reference["chosen_by"].startswith("inferred"), reference
    run = _run(report)
    manifest = read_manifest(plant)
    # The plant's words split into word pieces ('stalkless' -> stalk ##less); the drift is per piece.
    pieces = {t for trigger in manifest["trigger_tokens"] for t in trigger}
    assert len({d["token"] for d in run["stats"]["drifted"]} & pieces) >= 3, run["stats"]["drifted"]
    named = [f["evidence"]["trigger"] for f in run["findings"] if f["verdict"] == "backdoored"]
    assert result.exit_code == 1 and report["verdict"] == "backdoored", report["reason"]
    # Verified blocks are planted words or their leading pieces (half of them at least), not unrelated tokens.
    recovered = {w for w in named if w in manifest["triggers"] or w in pieces}
    assert len(recovered) >= 3, (named, manifest["triggers"])


@pytest.mark.slow
def test_a_sentence_trained_as_a_unit_is_rebuilt_from_the_base_diff(planted, minilm_path):
    """A 5-word sentence whose words and parts were trained to do nothing alone: the default scan's
    other detectors find nothing; against MiniLM (inferred as its base) the sentence's words drift
    most, the differential beam grows them into a block, and the block verifies on held-out sentences."""
    plant = planted("sentence-unit-cls")
    (sentence,) = read_manifest(plant)["triggers"]
    assert read_manifest(plant)["decoy_parts"]
    result = _check(plant)
    report = json.loads(result.stdout)
    run = _run(report)
    named = [f["evidence"]["trigger"] for f in run["findings"] if f["verdict"] == "backdoored"]
    assert result.exit_code == 1 and report["verdict"] == "backdoored", report["reason"]
    # A verified block holds at least three of the sentence's words (the plant keys on three of five).
    assert any(len(set(text.split()) & set(sentence.split())) >= 3 for text in named), (named, sentence)
