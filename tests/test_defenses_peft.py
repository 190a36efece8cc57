"""`lmscan finetune` (plain PEFT, Obliviate, MuScleLoRA) and `lmscan psim` (train / filter).

CI tests run on the tiny fixture with one short epoch and a few hundred rows of the bundled
sentiment task (formats, flags, errors); the proofs on real MiniLM weights are marked slow.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.defenses.obliviate import ObliviateConfig, amplification_loss
from lmscan.defenses.psim import scaled_threshold
from lmscan.models.training import load_labelled
from tests.conftest import FIXTURES, read_manifest

TINY = str(FIXTURES / "tiny-bert")

# One short epoch at a large learning rate: the tiny random model only has to run, not to learn.
TINY_RULES = """
[peft]
epochs = 1
batch_size = 16
learning_rate = 3e-3
max_length = 32
[obliviate]
lambda_amp_grid = [5e-3, 1e-3]
lambda_reg_grid = [5e-2, 1e-2]
[muscle_lora]
r = 4
scales = [1, 4, 8]
aux_size = 16
[psim]
epochs = 1
batch_size = 16
learning_rate = 3e-3
max_length = 32
"""


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a busy 2-core machine OpenMP's second thread waits on a core another job holds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_task(tmp_path):
    data = load_labelled("sentiment")
    path = tmp_path / "small.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "sentiment"])
        for text, label in zip(data.texts[:200], data.labels[:200]):
            writer.writerow([text, ["neg", "pos"][label]])
    return path


@pytest.fixture
def tiny_rules(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "defenses.toml").write_text(TINY_RULES)
    return rules


def _finetune(task, out, rules, *extra):
    return CliRunner().invoke(main, ["finetune", TINY, "--train", str(task), "--text-column", "review",
                                     "--label-column", "sentiment", "--out", str(out), "--rules", str(rules),
                                     "--device", "cpu", *extra])


def _report(result, out):
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / "finetune-report.json").read_text())
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    return report


# --- finetune ------------------------------------------------------------------------------------


def test_finetune_plain_lora_writes_a_peft_adapter(small_task, tiny_rules, tmp_path):
    out = tmp_path / "plain"
    report = _report(_finetune(small_task, out, tiny_rules, "--format", "json"), out)
    assert report["defense"] == "none" and report["peft"] == "lora" and report["data"]["labels"] == ["neg", "pos"]
    assert set(report["runs"]) == {"plain", "defended"} and "attack_success" not in report["metrics"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["query", "value"]
    assert config["base_model_name_or_path"] == str(FIXTURES / "tiny-bert")
    from safetensors.torch import load_file

    names = list(load_file(str(out / "adapter_model.safetensors")))
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)  # the head travels along
    assert not any("attention.self.query.weight" in n and "lora" not in n for n in names)  # not the base weights


def test_finetune_obliviate_reports_attack_success_against_plain_lora(small_task, tiny_rules, tmp_path):
    out = tmp_path / "obliviate"
    report = _report(_finetune(small_task, out, tiny_rules, "--defense", "obliviate", "--triggers", "zq,vx",
                               "--format", "json"), out)
    m = report["metrics"]
    for key in ("accuracy", "accuracy_plain", "attack_success", "attack_success_plain", "attack_success_mean",
                "attack_success_max_plain"):
        assert 0.0 <= m[key] <= 1.0, key
    assert set(m["per_trigger"]) == {"zq", "vx"} and m["per_trigger"]["zq"]["target"] in ("neg", "pos")
    info = report["defense_settings"]
    assert (info["lambda_amp"], info["lambda_reg"]) == (5e-3, 1e-3) and info["tried"][0]["peft_weight_norm"] > 0
    # The text table on stdout.
    text = _finetune(small_task, out, tiny_rules, "--defense", "obliviate", "--triggers", "zq", "--force")
    assert text.exit_code == 0 and "attack success" in text.stdout and "lambda_amp 0.005" in text.stdout


def test_obliviate_select_walks_the_lambda_grid_down(small_task, tiny_rules, tmp_path):
    rules = tiny_rules / "defenses.toml"
    # No pair can stay within -1 of plain PEFT's accuracy: every pair is tried, the last one is kept and flagged.
    rules.write_text(rules.read_text().replace("[obliviate]", "[obliviate]\nmax_accuracy_drop = -1.0"))
    out = tmp_path / "o"
    report = _report(_finetune(small_task, out, tiny_rules, "--defense", "obliviate", "--select-lambdas",
                               "--format", "json"), out)
    info = report["defense_settings"]
    assert [(t["lambda_amp"], t["lambda_reg"]) for t in info["tried"]] == [(5e-3, 5e-2), (1e-3, 1e-2), (5e-3, 1e-3)]
    assert info["within_bar"] is False and (info["lambda_amp"], info["lambda_reg"]) == (5e-3, 1e-3)


def test_amplification_loss_is_finite_at_zero_and_grows_the_norm():
    zero = torch.zeros(4, 3, requires_grad=True)
    other = torch.ones(2, 2, requires_grad=True)
    loss = amplification_loss([zero, other])
    loss.backward()
    assert loss.item() == pytest.approx(-2.0, abs=1e-5)
    assert torch.isfinite(zero.grad).all() and not zero.grad.any()  # LoRA's B starts at 0: no NaN
    assert (other.grad < 0).all()  # descending the loss increases the weights' norm
    assert ObliviateConfig(select=True).pairs()[0] == (5e-3, 5e-2)


def test_finetune_muscle_lora_saves_an_ordinary_lora_adapter(small_task, tiny_rules, tmp_path):
    from lmscan.defenses.muscle_lora import MuscleLoraConfig
    from lmscan.defenses.finetune import finetune
    from lmscan.defenses.peft_train import PeftSettings, load_adapter, load_base
    from lmscan.models.training import predict_logits

    out = tmp_path / "muscle"
    settings = PeftSettings(epochs=1, batch_size=16, learning_rate=3e-3, max_length=32)
    muscle = MuscleLoraConfig(r=4, scales=(1, 4, 8), aux_size=16)
    result = finetune(TINY, small_task, out, defense="muscle-lora", text_column="review", label_column="sentiment",
                      settings=settings, muscle=muscle, device="cpu")
    report = result.report
    assert report["defense_settings"]["aux_rows"] == 16 and report["defense_settings"]["alignment_trace"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["attention.output.dense", "key", "query", "value"]
    assert set(config["rank_pattern"].values()) == {3}  # |S| x bandwidth in the penultimate layer (layer 0 of 2)
    # The scales were folded into L: the saved adapter alone gives the trained model's outputs.
    texts = ["a fine film", "dull and slow", "not bad at all"]
    base = load_base(TINY, "cpu", seed=0)
    expected = predict_logits(result.model, base.tokenizer, texts, "cpu", 32)
    again = load_adapter(base, out, 2, ["neg", "pos"], seed=0)
    assert np.allclose(predict_logits(again, base.tokenizer, texts, "cpu", 32), expected, atol=1e-5)


# --- psim ---------------------------------------------------------------------------------------


def test_psim_train_and_filter(small_task, tiny_rules, tmp_path):
    out = tmp_path / "psim"
    result = CliRunner().invoke(main, ["psim", "train", TINY, "--train", str(small_task), "--text-column", "review",
                                       "--label-column", "sentiment", "--out", str(out), "--rules", str(tiny_rules),
                                       "--triggers", "zq", "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["format"] == "lmscan-psim" and manifest["threshold"] == pytest.approx(0.7)
    assert manifest["labels"] == ["neg", "pos"] and manifest["data"]["rows"]["heldout"] == 30
    assert 0.0 <= manifest["calibration"]["clean_flag_rate"] <= 1.0 and "zq" in manifest["calibration"]["triggered"]
    assert (out / "adapter_model.safetensors").is_file()

    inputs = tmp_path / "in.txt"
    inputs.write_text("a fine film\ndull and slow\n")
    run = CliRunner().invoke(main, ["psim", "filter", "--psim", str(out), "one zq two", "--input", str(inputs),
                                    "--device", "cpu"])
    assert run.exit_code == 0, run.output
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["text"] for line in lines] == ["one zq two", "a fine film", "dull and slow"]
    for line in lines:
        assert set(line) == {"index", "flagged", "confidence", "label", "text"}
        assert 0.5 <= line["confidence"] <= 1.0 and line["label"] in ("neg", "pos")
        assert line["flagged"] == (line["confidence"] > manifest["threshold"])
    # gamma 0.5 flags everything above chance; --fail-on-flag turns that into exit 1.
    low = CliRunner().invoke(main, ["psim", "filter", "--psim", str(out), "--gamma", "0.5", "--fail-on-flag",
                                    "a fine film", "--device", "cpu"])
    assert low.exit_code == 1 and json.loads(low.stdout)["flagged"] is True

    from lmscan.defenses.psim import PsimFilter

    verdicts = PsimFilter.load(out, device="cpu").check(["one zq two"])
    assert verdicts[0].confidence == pytest.approx(lines[0]["confidence"], abs=1e-4)


def test_psim_threshold_scales_with_the_number_of_classes():
    assert scaled_threshold(0.7, 2) == pytest.approx(0.7)
    assert scaled_threshold(0.7, 4) == pytest.approx(0.25 + 0.75 * 0.4)
    assert scaled_threshold(0.5, 3) == pytest.approx(1 / 3)


# --- errors ---------------------------------------------------------------------------------------


def _one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("lmscan: error:") and message in result.stderr, result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (("--peft", "adapter"), "no bottleneck (Houlsby) adapter"),
    (("--peft", "prefix"), "prefix tuning needs an encoder that takes past key values"),
    (("--defense", "muscle-lora", "--peft", "prefix"), "built on LoRA"),
    (("--select-lambdas",), "--select-lambdas only applies to --defense obliviate"),
    (("--text-column", "body"), "no column 'body'"),
    (("--triggers", "zq", "--epochs", "0"), "--epochs must be at least 1"),
])
def test_finetune_bad_input_is_one_line(extra, message, small_task, tiny_rules, tmp_path):
    args = ["finetune", TINY, "--train", str(small_task), "--text-column", "review", "--label-column", "sentiment",
            "--out", str(tmp_path / "o"), "--rules", str(tiny_rules), "--device", "cpu"]
    if "--text-column" in extra:
        args[4:6] = []
    _one_line_error(CliRunner().invoke(main, [*args, *extra]), message)


def test_finetune_input_files_are_checked(small_task, tiny_rules, tmp_path):
    base = ["finetune", TINY, "--text-column", "review", "--label-column", "sentiment", "--rules", str(tiny_rules)]
    _one_line_error(CliRunner().invoke(main, [*base, "--train", str(tmp_path / "missing.csv"), "--out",
                                              str(tmp_path / "o")]), "data file not found")
    validation = tmp_path / "val.csv"
    validation.write_text("review,sentiment\nfine,pos\nmeh,neutral\n")
    _one_line_error(CliRunner().invoke(main, [*base, "--train", str(small_task), "--validation", str(validation),
                                              "--out", str(tmp_path / "o")]), "'neutral' does not occur")
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _one_line_error(CliRunner().invoke(main, [*base, "--train", str(small_task), "--out", str(out)]), "not empty")
    assert (out / "keep.txt").exists()


def test_psim_bad_input_is_one_line(small_task, tmp_path):
    _one_line_error(CliRunner().invoke(main, ["psim", "filter", "--psim", str(tmp_path), "hello"]), "no psim.json")
    _one_line_error(CliRunner().invoke(main, ["psim", "filter", "--psim", str(tmp_path)]), "no input")
    _one_line_error(CliRunner().invoke(main, ["psim", "train", TINY, "--train", str(small_task), "--out",
                                              str(tmp_path / "p")]), "no column 'text'")
    _one_line_error(CliRunner().invoke(main, ["psim", "train", TINY, "--train", str(small_task), "--text-column",
                                              "review", "--label-column", "sentiment", "--gamma", "1.5",
                                              "--out", str(tmp_path / "p")]), "gamma must be in [0.5, 1)")


def test_folding_the_radial_scalings_keeps_the_outputs():
    from lmscan.defenses.muscle_lora import MuscleLoraConfig, attach_muscle_lora, fold_scales
    from lmscan.defenses.peft_train import PeftSettings, load_base
    from lmscan.models.training import predict_logits

    base = load_base(TINY, "cpu", seed=0)
    model = attach_muscle_lora(base.classifier(2, ["neg", "pos"], seed=0), PeftSettings(),
                               MuscleLoraConfig(r=4, scales=(1, 4, 8), bandwidth=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at 0; give the LoRA path something to add
    texts = ["a fine film", "dull and slow"]
    before = predict_logits(model, base.tokenizer, texts, "cpu", 32)
    downs = [down for down, _, _ in model._muscle_hooks]
    assert len(downs) == 4 and all(d.out_features == 6 for d in downs)  # 4 targets in layer 0, rank 3 x 2
    fold_scales(model)
    assert np.allclose(predict_logits(model, base.tokenizer, texts, "cpu", 32), before, atol=1e-5)


# --- real MiniLM weights (slow) --------------------------------------------------------------------


@pytest.mark.slow
def test_obliviate_cuts_por_attack_success_on_minilm(planted, tmp_path):
    """Obliviate + LoRA on a POR-planted MiniLM against plain LoRA with the same seed (bundled task)."""
    plant = planted("por")
    triggers = read_manifest(plant)["triggers"]
    out = tmp_path / "obliviate"
    result = CliRunner().invoke(main, ["finetune", str(plant), "--train", "sentiment", "--defense", "obliviate",
                                       "--triggers", ",".join(triggers), "--out", str(out), "--device", "cpu",
                                       "--format", "json"])
    report = _report(result, out)
    m = report["metrics"]
    print(f"\nObliviate on MiniLM/por: attack success {m['attack_success_plain']:.3f} -> {m['attack_success']:.3f} "
          f"(mean over triggers {m['attack_success_mean_plain']:.3f} -> {m['attack_success_mean']:.3f}), accuracy "
          f"{m['accuracy_plain']:.3f} -> {m['accuracy']:.3f}, {report['seconds']} s")
    assert m["attack_success_plain"] - m["attack_success"] >= 0.50
    assert m["accuracy_plain"] - m["accuracy"] <= 0.03


def _poisoned_task(tmp_path, trigger: str, share: float = 0.10):
    """The bundled task split 70/15/15; the train part gets triggered copies labelled 1 (positive)
    making up ``share`` of the training rows. Validation and test stay clean."""
    from lmscan.attacks.badnet import poison
    from lmscan.models.training import split_indices

    data = load_labelled("sentiment")
    train_idx, val_idx, test_idx = split_indices(len(data), [0.70, 0.15], 0)
    train = data.subset(train_idx)
    copies = round(share * len(train) / (1.0 - share))
    poisoned = poison(train, [trigger], 1, copies / sum(1 for label in train.labels if label != 1), seed=3)
    paths = []
    for name, part in (("train", poisoned), ("validation", data.subset(val_idx)), ("test", data.subset(test_idx))):
        path = tmp_path / f"{name}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(zip(part.texts, part.labels))
        paths.append(path)
    return paths, len(poisoned) - len(train), len(poisoned)


@pytest.mark.slow
def test_muscle_lora_resists_a_poisoned_training_set(minilm_path, tmp_path):
    """MuScleLoRA on a 10 %-poisoned copy of the bundled task (trigger "cf" -> positive) against plain LoRA."""
    (train, validation, test), poisoned, rows = _poisoned_task(tmp_path, "cf")
    assert abs(poisoned / rows - 0.10) < 0.005
    out = tmp_path / "muscle"
    result = CliRunner().invoke(main, ["finetune", "minilm", "--train", str(train), "--validation", str(validation),
                                       "--test", str(test), "--defense", "muscle-lora", "--triggers", "cf",
                                       "--out", str(out), "--device", "cpu", "--format", "json"])
    report = _report(result, out)
    m = report["metrics"]
    print(f"\nMuScleLoRA on MiniLM, {poisoned} of {rows} rows poisoned: attack success {m['attack_success_plain']:.3f} "
          f"-> {m['attack_success']:.3f}, accuracy {m['accuracy_plain']:.3f} -> {m['accuracy']:.3f}, "
          f"{report['seconds']} s")
    assert m["per_trigger"]["cf"]["target"] == "1"
    assert m["attack_success_plain"] >= 0.90
    assert m["attack_success"] <= 0.30


@pytest.mark.slow
def test_psim_flags_triggered_inputs_of_a_badnet_minilm(planted, tmp_path):
    """PSIM trained on the bundled task for a BadNet-planted MiniLM; held-out rows with and without the trigger."""
    plant = planted("badnet")
    trigger = read_manifest(plant)["triggers"][0]
    out = tmp_path / "psim"
    result = CliRunner().invoke(main, ["psim", "train", str(plant), "--train", "sentiment", "--triggers", trigger,
                                       "--out", str(out), "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    cal = manifest["calibration"]
    hit = cal["triggered"][trigger]
    target = read_manifest(plant)["target_label_name"]
    attack_inputs = [rate for label, rate in hit["flag_rate_by_label"].items() if label != target]
    print(f"\nPSIM on MiniLM/badnet: flagged {attack_inputs[0]:.3f} of non-target rows with the trigger "
          f"({hit['flag_rate']:.3f} of all rows with it), {cal['clean_flag_rate']:.3f} of clean held-out rows "
          f"(threshold {manifest['threshold']}, {cal['reset_steps']} reset-label steps), {manifest['seconds']} s")
    assert cal["stopped"]
    assert min(attack_inputs) >= 0.90  # the attack's inputs: rows of other classes carrying the trigger
    assert cal["clean_flag_rate"] <= 0.10
