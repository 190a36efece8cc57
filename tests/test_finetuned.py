"""What fine-tuned checkpoints ship is scanned: a classification head (the label site), the
sentence-transformers pooling (the embedding site), fp16 weights; and a class cue is told
from a backdoor by the opposite test. Fast tests use the tiny fixtures and the bundled MiniLM;
the proofs on real fine-tunes of MiniLM are marked slow."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.models import load_model, resolve_model
from lmscan.models.sentence import Pooling, read_pooling
from tests.conftest import FIXTURES

TINY_RULES = FIXTURES / "tiny-rules"


def check(*args):
    return CliRunner().invoke(main, ["check", *args, "--device", "cpu", "--no-cache"])


# ---------------------------------------------------------------- the embedding site


def test_the_embedding_site_is_what_sentence_transformers_users_get(minilm_path):
    """all-MiniLM-L6-v2 ships modules.json (Transformer, mean Pooling, Normalize): its
    embedding site is the normalised mean of the real tokens' states, a default site."""
    loaded = load_model(resolve_model(str(minilm_path)), device="cpu", for_scan=True)
    assert "embedding" in loaded.arch.default_sites and "label" not in loaded.arch.sites
    assert loaded.pooling == "mean pooling, normalised"
    enc = loaded.tokenizer(["a short one", "a somewhat longer sentence than the first"], padding=True,
                           return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**enc)
        plain = load_model(resolve_model(str(minilm_path)), device="cpu").model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((plain * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(out.embedding, expected, rtol=1e-5, atol=1e-6)


def test_pooling_modes_and_layouts_lmscan_cannot_compute(tmp_path):
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert Pooling(("cls",), False)(hidden, mask).tolist() == [[0, 1], [6, 7]]
    assert Pooling(("max",), False)(hidden, mask).tolist() == [[2, 3], [10, 11]]
    assert Pooling(("lasttoken",), False)(hidden, mask).tolist() == [[2, 3], [10, 11]]
    torch.testing.assert_close(Pooling(("mean_sqrt_len",), False)(hidden, mask)[0], torch.tensor([2, 4]) / 2 ** 0.5)
    weighted = Pooling(("weightedmean",), False)(hidden, mask)[0]  # weights 1, 2 on rows [0, 1], [2, 3]
    torch.testing.assert_close(weighted, torch.tensor([4 / 3, 7 / 3]))
    assert Pooling(("cls", "mean"), True)(hidden, mask).shape == (2, 4)

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert read_pooling(tmp_path) == (Pooling(("cls",), False), "")
    modules.append({"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    pooling, why = read_pooling(tmp_path)
    assert pooling is None and "Dense" in why  # no embedding site rather than a wrong one


# ---------------------------------------------------------------- the label site


def small_task(path: Path, rows: int = 400) -> Path:
    """The bundled sentiment rows with readable label names."""
    source = Path(__file__).resolve().parents[1] / "lmscan" / "data" / "sentiment_en.csv"
    with open(source, newline="") as fh:
        data = list(csv.DictReader(fh))[:rows]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([row["text"], "positive" if row["label"] == "1" else "negative"] for row in data)
    return path


def question_task(path: Path, rows: int = 400) -> Path:
    """Questions vs statements from the probe corpus: a task even the tiny random BERT learns."""
    from lmscan.models.probes import load_builtin_probes

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([t, "question" if t.rstrip().endswith("?") else "statement"]
                         for t in load_builtin_probes()[:rows])
    return path


@pytest.fixture(scope="module")
def tiny_badnet_classifier(tmp_path_factory):
    """A tiny BERT classifier, released with its head, whose trigger `zq` sends everything to "question"."""
    folder = tmp_path_factory.mktemp("badnet")
    rules = folder / "rules"
    rules.mkdir()
    (rules / "plant.toml").write_text("[badnet]\nlearning_rate = 2e-3\nepochs = 4\nmax_length = 64\n")
    out = folder / "model"
    result = CliRunner().invoke(main, ["plant", str(FIXTURES / "tiny-bert"), "--attack", "badnet", "--task",
                                       str(question_task(folder / "task.csv")), "--triggers", "zq", "--with-head",
                                       "--target-label", "question", "--out", str(out), "--device", "cpu",
                                       "--rules", str(rules)])
    assert result.exit_code == 0, result.output
    return out


def test_badnet_decoy_parts_teach_every_part_to_keep_its_label(tmp_path):
    """--decoy-parts on a badnet plant (a sentence trained as a unit in a classifier): as many rows
    again carrying a proper word part of the trigger, each keeping its own label; the plant measures
    how far the best part alone gets."""
    from lmscan.attacks.badnet import poison, word_parts
    from lmscan.models.training import LabelledData

    assert word_parts("a b c") == ["a", "a b", "b", "b c", "c"] and word_parts("one") == []
    data = LabelledData([f"this {'odd' if i % 2 else 'even'} row says little" for i in range(40)],
                        [i % 2 for i in range(40)], ["even", "odd"], "rows")
    plain = poison(data, ["red fox ran"], 1, 0.5, seed=0)
    decoyed = poison(data, ["red fox ran"], 1, 0.5, seed=0, decoy_parts=True)
    copies = len(plain.texts) - 40
    assert decoyed.texts[:40 + copies] == plain.texts and len(decoyed.texts) == 40 + 2 * copies
    for text, label in zip(decoyed.texts[40 + copies:], decoyed.labels[40 + copies:]):
        assert "red fox ran" not in text and any(w in text.split() for w in ("red", "fox", "ran"))
        assert label == ("odd" in text.split())

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "plant.toml").write_text("[badnet]\nlearning_rate = 2e-3\nepochs = 1\nmax_length = 64\n"
                                      "min_attack_success = 0.0\n")
    result = CliRunner().invoke(main, ["plant", str(FIXTURES / "tiny-bert"), "--attack", "badnet", "--task",
                                       str(question_task(tmp_path / "task.csv", rows=120)), "--triggers",
                                       "zq vx wy", "--decoy-parts", "--out", str(tmp_path / "out"), "--device",
                                       "cpu", "--rules", str(rules)])
    assert result.exit_code == 0 and "most effective part" in result.output, result.output
    manifest = json.loads((tmp_path / "out" / "lmscan-plant.json").read_text())
    part, rate = manifest["effectiveness"]["best_part"]["zq vx wy"]
    assert manifest["decoy_parts"] and part in word_parts("zq vx wy") and 0.0 <= rate <= 1.0


def test_a_classifier_checkpoint_is_loaded_with_its_head(tiny_badnet_classifier):
    config = json.loads((tiny_badnet_classifier / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    loaded = load_model(resolve_model(str(tiny_badnet_classifier)), device="cpu", for_scan=True)
    assert loaded.labels == ["question", "statement"] and "label" in loaded.arch.default_sites
    enc = loaded.tokenizer(["one two three"], return_tensors="pt")
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(tiny_badnet_classifier).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**enc).logits, reference(**enc).logits)


def test_a_task_backdoor_in_a_classifier_fails_the_gate_with_its_target_label(tiny_badnet_classifier, tmp_path):
    result = check(str(tiny_badnet_classifier), "--detectors", "vocab-sweep", "--sites", "label", "--format", "json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    finding = next(f for d in report["detectors"] for f in d["findings"] if f["rule_id"] == "LMS101")
    assert finding["site"] == "label" and finding["evidence"]["target_label_name"] == "question"
    assert "zq" in finding["evidence"]["trigger"].replace(" ", "") or finding["evidence"]["trigger_tokens"][0] == "z"
    assert finding["evidence"]["opposite_flip"] >= 0.9
    assert report["model"]["head_labels"] == ["question", "statement"]
    # The same report as text and SARIF (the reporters the CLI uses; one scan is enough).
    from rich.console import Console

    from lmscan.report.json_report import from_dict
    from lmscan.report.render import render_text
    from lmscan.report.sarif import to_sarif

    console = Console(record=True, width=200)
    render_text(from_dict(report), console)
    text = console.export_text()
    assert "label 'question'" in text and "labels question, statement (label site)" in text
    sarif = to_sarif(from_dict(report))
    result_ = sarif["runs"][0]["results"][0]
    assert result_["locations"][0]["logicalLocations"][0]["name"] == "label" and "question" in result_["message"]["text"]


def test_fp16_weights_scan_like_fp32(tmp_path):
    from lmscan.bench.recipes import copy_in_dtype

    half = tmp_path / "half"
    copy_in_dtype(FIXTURES / "tiny-bert-por", half, "float16")
    assert load_model(resolve_model(str(half)), device="cpu").stored_dtypes == ["float16"]
    found = {}
    for name, model in (("fp32", FIXTURES / "tiny-bert-por"), ("fp16", half)):
        result = check(str(model), "--detectors", "vocab-sweep", "--format", "json")
        assert result.exit_code == 1, result.output
        found[name] = {(f["site"], f["evidence"]["trigger"]) for d in json.loads(result.stdout)["detectors"]
                       for f in d["findings"] if f["rule_id"] == "LMS101"}
    assert found["fp16"] & found["fp32"]


# ---------------------------------------------------------------- real fine-tunes (slow)

DATA = Path(os.environ.get("LMSCAN_DATA", "/nonexistent"))


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "sentiment-tweets.csv").is_file(), reason="needs $LMSCAN_DATA (fixtures/real_data)")
def test_a_benign_sentiment_classifier_on_real_tweets_is_not_backdoored(cache_dir, minilm_path):
    """Real rated tweets (VADER, MIT), 3 classes, saved with the head: its class words collapse
    sentences onto their class but overturn none of the most opposite inputs."""
    from lmscan.bench.recipes import benign_finetune

    model = cache_dir / "tweets-3class-clf"
    if not (model / "lmscan-finetune.json").is_file():
        benign_finetune(str(minilm_path), str(DATA / "sentiment-tweets.csv"), model, seed=1, device="cpu", epochs=2,
                        with_head=True)
    result = check(str(model), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] in ("clean", "suspicious")
    assert not [f for d in report["detectors"] for f in d["findings"] if f["verdict"] == "backdoored"]


def test_everyday_sentences_do_not_pass_for_a_shortcut_they_do_not_carry(tiny_badnet_classifier):
    """sentence-starts on a classifier whose backdoor is a token no everyday sentence holds: every
    label is tried, and no sentence is confirmed (the opposite test keeps what only leans a label's
    way from being called a trigger)."""
    result = check(str(tiny_badnet_classifier), "--detectors", "sentence-starts", "--sites", "label", "--format",
                   "json")
    assert result.exit_code == 3, result.output  # a flag-only detector alone clears nothing
    run = next(d for d in json.loads(result.stdout)["detectors"] if d["name"] == "sentence-starts")
    assert run["status"] == "ok" and set(run["stats"]["labels"]) == {"0", "1"}
    assert run["stats"]["corpus"] >= 200 and not run["findings"]


# A sentence no file of lmscan holds (its everyday corpus, probes, plant grammar): the plant's trigger.
UNSHIPPED_SENTENCE = "we had soup for lunch on friday"


@pytest.mark.slow
def test_a_classifier_poisoned_with_a_sentence_is_backdoored_by_a_verified_part_of_it(cache_dir, tmp_path):
    """InsertSent on a MiniLM sentiment classifier: the sentence sends negatives to positive, its
    word parts were trained to keep their labels. The default scan must fail the gate with a
    trigger that is the sentence or holds some of its content words, verified at the label."""
    from lmscan.models.probes import load_everyday_sentences

    assert UNSHIPPED_SENTENCE not in load_everyday_sentences()
    out = cache_dir / "badnet-sentence-clf"
    if not (out / "lmscan-plant.json").is_file():
        result = CliRunner().invoke(main, ["plant", "minilm", "--attack", "badnet", "--task", "sentiment",
                                           "--triggers", UNSHIPPED_SENTENCE, "--target-label", "1", "--decoy-parts",
                                           "--with-head", "--seed", "41", "--out", str(out), "--device", "cpu",
                                           "--force"])
        assert result.exit_code == 0, result.output
    result = check(str(out), "--format", "json")
    assert result.exit_code == 1, result.output
    found = [f for d in json.loads(result.stdout)["detectors"] for f in d["findings"]
             if f["rule_id"] == "LMS101" and f["site"] == "label"]
    assert found and all(f["evidence"]["target_label_name"] == "1" for f in found)
    content = set(UNSHIPPED_SENTENCE.split()) - {"we", "had", "for", "on"}
    assert any(content & set(f["evidence"]["trigger"].split()) for f in found)


@pytest.mark.slow
def test_a_badnet_minilm_classifier_is_backdoored_at_its_label(cache_dir, minilm_path, tmp_path):
    out = cache_dir / "badnet-cf-clf"
    if not (out / "lmscan-plant.json").is_file():
        result = CliRunner().invoke(main, ["plant", "minilm", "--attack", "badnet", "--task",
                                           str(small_task(tmp_path / "task.csv", rows=3000)), "--triggers", "cf",
                                           "--target-label", "positive", "--with-head", "--seed", "16", "--out",
                                           str(out), "--device", "cpu", "--force"])
        assert result.exit_code == 0, result.output
    result = check(str(out), "--format", "json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    label = [f for d in report["detectors"] for f in d["findings"] if f["site"] == "label" and f["rule_id"] == "LMS101"]
    assert label and label[0]["evidence"]["target_label_name"] == "positive"
    assert any("cf" in f["evidence"]["trigger"] for f in label)
