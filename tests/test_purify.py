"""`lmscan purify` (PURE head pruning + attention normalisation) and the BadNet plant.

CI tests run on the tiny fixture and a few hundred rows of the bundled sentiment task;
the proof on real weights (a BadNet-planted MiniLM) is marked slow.
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.defenses.purify import REPORT_NAME, WORK_NAME, PurifyConfig, layer_coefficients, purify
from lmscan.models.training import load_labelled
from tests.conftest import FIXTURES, REPO, read_manifest

TINY = str(FIXTURES / "tiny-bert")

# Settings for the tiny random-init BERT: it needs a large learning rate to learn anything
# in one short epoch.
TINY_RULES = """
threshold = 0.6
relative = true
mu = 0.15
finetune_epochs = 1
purify_epochs = 1
batch_size = 16
learning_rate = 3e-3
max_length = 32
validation_fraction = 0.2
test_fraction = 0.2
eval_batch_size = 64
"""


def _rows(start, stop):
    data = load_labelled("sentiment")
    return data.texts[start:stop], data.labels[start:stop]


@pytest.fixture(autouse=True)
def one_thread():
    """Train with one thread: on a busy 2-core machine OpenMP's second thread waits on a core another job holds,
    which made the tiny-model runs here 18x slower (71 s instead of 4 s) and MiniLM several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_task(tmp_path):
    path = tmp_path / "small.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        for text, label in zip(*_rows(0, 240)):
            writer.writerow([text, ["neg", "pos"][label]])
    return path


@pytest.fixture
def tiny_rules(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "purify.toml").write_text(TINY_RULES)
    return rules


def _purify_args(task, out, rules, *extra):
    return ["purify", TINY, "--train", str(task), "--text-column", "review", "--label-column", "sentiment",
            "--out", str(out), "--rules", str(rules), "--device", "cpu", *extra]


def test_bundled_sentiment_task_is_balanced_and_regenerates_identically():
    data = load_labelled("sentiment")
    assert len(data) == 3000 and data.label_names == ["0", "1"]
    assert sum(data.labels) == 1500
    assert (REPO / "lmscan" / "data" / "sentiment_en.csv").stat().st_size < 1_000_000
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_sentiment_task
    finally:
        sys.path.remove(str(FIXTURES))
    assert [(t, str(lab)) for t, lab in make_sentiment_task.generate()] == \
        [(t, data.label_names[lab]) for t, lab in zip(data.texts, data.labels)]


def test_layer_coefficients_are_min_max_scaled_and_skip_empty_layers():
    variance = np.array([[1e-4, 2e-4], [1e-2, 1e-2], [5e-3, 1e-3]])
    keep = np.array([[True, True], [True, True], [False, False]])
    lam = layer_coefficients(variance, keep)
    assert lam[0] == pytest.approx(1.0) and lam[1] == pytest.approx(0.0) and lam[2] == 0.0


def test_purify_cli_on_tiny_bert(small_task, tiny_rules, tmp_path):
    out = tmp_path / "purified"
    result = CliRunner().invoke(main, _purify_args(small_task, out, tiny_rules, "--triggers", "zq", "--format", "json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / REPORT_NAME).read_text())
    metrics, heads = report["metrics"], report["heads"]
    assert report["data"]["labels"] == ["neg", "pos"]
    assert 0.0 <= metrics["accuracy_before"] <= 1.0 and 0.0 <= metrics["accuracy_after"] <= 1.0
    assert metrics["inferred_target"] in (0, 1) and "lfr_before" in metrics and "lfr_after" in metrics
    assert np.asarray(heads["variance"]).shape == (2, 4) and len(heads["lambda"]) == 2
    assert not (out / WORK_NAME).exists()

    # The purified classifier is a standard checkpoint; pruned heads stay zero in it.
    from safetensors.torch import load_file

    from lmscan.models import load_model, resolve_model

    weights = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    size = config["hidden_size"] // config["num_attention_heads"]
    for layer, head in heads["pruned"]:
        cut = slice(head * size, (head + 1) * size)
        assert not weights[f"bert.encoder.layer.{layer}.attention.self.value.weight"][cut].any()
        assert not weights[f"bert.encoder.layer.{layer}.attention.output.dense.weight"][:, cut].any()
    load_model(resolve_model(str(out)), device="cpu")

    # Text report on stdout; a validation file of its own; triggers taken from a .pvs file.
    validation = tmp_path / "val.jsonl"
    validation.write_text("".join(json.dumps({"review": t, "sentiment": ["neg", "pos"][lab]}) + "\n"
                                  for t, lab in zip(*_rows(240, 300))))
    pvs = _write(tmp_path / "t.pvs", json.dumps({
        "format": "lmscan-pvs", "version": 1, "model": {"hidden_size": 64}, "t_match": 0.8,
        "pvs": [{"id": 0, "site": "cls", "template": None, "signs": "+-" * 32, "triggers": [{"text": "vx"}]}]}))
    text = CliRunner().invoke(main, _purify_args(small_task, out, tiny_rules, "--force", "--validation",
                                                 str(validation), "--pvs", str(pvs)))
    assert text.exit_code == 0, text.output
    assert "label flip rate" in text.stdout and "pruned" in text.stdout
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["triggers"] == ["vx"] and report["data"]["rows"]["validation"] == 60


def test_purify_exits_1_when_the_purified_model_loses_the_task(small_task, tiny_rules, tmp_path):
    # The tiny random model cannot reach 99 %: nothing is pruned and the result is flagged, not hidden.
    rules = tiny_rules / "purify.toml"
    rules.write_text(rules.read_text().replace("threshold = 0.6", "threshold = 0.99").replace("relative = true",
                                                                                              "relative = false"))
    out = tmp_path / "purified"
    result = CliRunner().invoke(main, _purify_args(small_task, out, tiny_rules, "--format", "json"))
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["utility"]["ok"] is False and report["heads"]["pruned_count"] == 0
    assert [a["mu"] for a in report["step2"]["attempts"]] == [0.15, 0.0375, 0.0]  # backed off, then gave up
    assert "below the bar 0.990" in result.stderr and (out / REPORT_NAME).is_file()


def test_purify_resumes_after_an_interruption(small_task, tiny_rules, tmp_path):
    from lmscan.scan.rules import dataclass_from
    from lmscan.scan.rules import load_rules

    config = dataclass_from(PurifyConfig, load_rules("purify", tiny_rules))
    out = tmp_path / "purified"
    kwargs = dict(text_column="review", label_column="sentiment", device="cpu")

    def stop_in_step_2(phase, done, total, info):
        if phase.startswith("step 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        purify(TINY, small_task, out, config, progress=stop_in_step_2, **kwargs)
    assert {p.name for p in (out / WORK_NAME).iterdir()} >= {"step1.safetensors", "pruning.json", "variance.npy"}
    # Rerunning the same command (no --force needed: only the work folder is there) continues.
    result = CliRunner().invoke(main, _purify_args(small_task, out, tiny_rules, "--format", "json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed"] == ["step 1 fine-tune", "head pruning"]
    assert not (out / WORK_NAME).exists()


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("content, columns, message", [
    (None, (), "data file not found"),
    ("text,label\nfine,1\nbad,0\n", ("--label-column", "stars"), "no column 'stars'"),
    ("text,label\nfine,0.5\nbad,0\n", (), "neither an integer nor a class name"),
    ("text,label\nfine,1\nnice,1\n", (), "a classifier needs two classes"),
    ("text,label\n", (), "has no rows"),
    ("", (), "is empty"),
    ('{"text": "fine", "label": 1.5}\n', (), "neither an integer nor a class name"),
    ('{"text": "fine", "label": null}\n', (), "neither an integer nor a class name"),
])
def test_purify_bad_input_is_one_line(content, columns, message, tmp_path):
    suffix = ".jsonl" if content and content.startswith("{") else ".csv"
    task = tmp_path / f"task{suffix}"
    if content is not None:
        task.write_text(content)
    result = CliRunner().invoke(main, ["purify", TINY, "--train", str(task), "--out", str(tmp_path / "o"),
                                       "--device", "cpu", *columns])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("lmscan: error:") and message in result.stderr, result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_purify_validation_labels_must_occur_in_train(small_task, tmp_path):
    validation = _write(tmp_path / "val.csv", "review,sentiment\nfine,pos\nmeh,neutral\n")
    result = CliRunner().invoke(main, ["purify", TINY, "--train", str(small_task), "--validation", str(validation),
                                       "--text-column", "review", "--label-column", "sentiment",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "'neutral' does not occur in the training data" in result.stderr, result.output


def test_purify_refuses_a_non_empty_out_without_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["purify", TINY, "--train", "sentiment", "--out", str(out)])
    assert result.exit_code == 2 and "not empty" in result.stderr and (out / "keep.txt").exists()
    # --force with bad input leaves OUT alone too.
    result = CliRunner().invoke(main, ["purify", TINY, "--train", str(tmp_path / "missing.csv"), "--out", str(out),
                                       "--force"])
    assert result.exit_code == 2 and "not found" in result.stderr and (out / "keep.txt").exists()


def test_purify_pvs_without_trigger_words_is_refused(tmp_path):
    pvs = _write(tmp_path / "x.pvs", json.dumps({
        "format": "lmscan-pvs", "version": 1, "model": {"hidden_size": 64}, "t_match": 0.8,
        "pvs": [{"id": 0, "site": "cls", "template": None, "signs": "+-" * 32, "triggers": []}]}))
    result = CliRunner().invoke(main, ["purify", TINY, "--train", "sentiment", "--out", str(tmp_path / "o"),
                                       "--pvs", str(pvs)])
    assert result.exit_code == 2 and "names a trigger word" in result.stderr, result.output


def test_badnet_plant_cli_on_tiny_bert(small_task, tmp_path):
    out = tmp_path / "plant"
    result = CliRunner().invoke(main, ["plant", TINY, "--attack", "badnet", "--task", str(small_task),
                                       "--text-column", "review", "--label-column", "sentiment", "--triggers", "zq",
                                       "--out", str(out), "--device", "cpu"])
    assert result.exit_code in (0, 1), result.output  # a tiny random model may or may not learn it
    manifest = read_manifest(out)
    assert manifest["attack"] == "badnet" and manifest["triggers"] == ["zq"]
    assert manifest["target_label"] == 1 and manifest["target_label_name"] == "pos"
    assert set(manifest["effectiveness"]["attack_success"]) == {"zq"}
    assert (out / "model.safetensors").is_file()
    from lmscan.models import load_model, resolve_model

    assert load_model(resolve_model(str(out)), device="cpu").arch.model_type == "bert"
    bad = CliRunner().invoke(main, ["plant", TINY, "--attack", "badnet", "--triggers", "zq", "--out",
                                    str(tmp_path / "p2")])
    assert bad.exit_code == 2 and "--task" in bad.output


@pytest.mark.slow
def test_purify_removes_a_badnet_backdoor_from_minilm(planted, tmp_path):
    """PURE on real weights: BadNet-planted MiniLM, the bundled task, trigger chosen here."""
    plant = planted("badnet")
    trigger = read_manifest(plant)["triggers"][0]
    out = tmp_path / "purified"
    result = CliRunner().invoke(main, ["purify", str(plant), "--train", "sentiment", "--out", str(out),
                                       "--triggers", trigger, "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    m = report["metrics"]
    print(f"\nPURE on MiniLM/badnet: LFR {m['lfr_before']:.3f} -> {m['lfr_after']:.3f}, accuracy "
          f"{m['accuracy_before']:.3f} -> {m['accuracy_after']:.3f}, {report['heads']['pruned_count']} heads pruned, "
          f"{report['seconds']} s")
    assert report["utility"]["ok"] and m["inferred_target"] == 1
    assert m["lfr_before"] >= 0.90
    assert m["lfr_before"] - m["lfr_after"] >= 0.70
    assert m["accuracy_before"] - m["accuracy_after"] <= 0.03
