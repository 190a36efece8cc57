"""PURE-style head profiling: the `attention` detector and `lmscan heads`."""

from __future__ import annotations

import json
import xml.dom.minidom

import numpy as np
import pytest
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.detectors.attention import cls_attention_variance
from lmscan.models import load_model, resolve_model
from tests.conftest import FIXTURES


def test_padding_does_not_change_the_variance():
    """The reference code scores padding as tokens; lmscan masks it."""
    loaded = load_model(resolve_model(str(FIXTURES / "tiny-bert")), device="cpu", eager_attention=True)
    short = "the cat sat"
    alone = cls_attention_variance(loaded.model, loaded.tokenizer, [short], loaded.device)
    padded = cls_attention_variance(loaded.model, loaded.tokenizer, [short, short + " and then" * 8], loaded.device)
    np.testing.assert_allclose(alone[0], padded[0], rtol=1e-5)
    assert alone.shape == (1, loaded.config.num_hidden_layers, loaded.config.num_attention_heads)


@pytest.mark.parametrize("fixture, expected", [("tiny-bert", 0), ("tiny-bert-por", 1)])
def test_heads_cli_on_tiny_fixtures(fixture, expected, tmp_path):
    plot = tmp_path / "heads.svg"
    result = CliRunner().invoke(main, ["heads", str(FIXTURES / fixture), "--triggers", "zq,vx", "--format", "json",
                                       "--plot", str(plot), "--device", "cpu"])
    assert result.exit_code == expected, result.output
    data = json.loads(result.stdout)
    scores = np.array(data["stats"]["triggers"]["vx"])
    assert scores.shape == (2, 4)
    assert (scores.max() >= data["threshold"]) == bool(expected)
    assert xml.dom.minidom.parse(str(plot)).getElementsByTagName("rect").length == 8


def test_heads_plot_must_be_svg(tmp_path):
    result = CliRunner().invoke(main, ["heads", str(FIXTURES / "tiny-bert"), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and ".svg" in result.output


def test_heads_on_real_por_plant_and_clean_minilm(planted, minilm_path):
    """Given a POR plant's true triggers, `lmscan heads` flags heads for them; the same
    words on the unmodified MiniLM move no head beyond random words."""
    from tests.conftest import read_manifest

    plant = planted("por")
    triggers = read_manifest(plant)["triggers"]
    runs = {}
    for name, path in [("por", plant), ("clean", minilm_path)]:
        result = CliRunner().invoke(main, ["heads", str(path), "--triggers", ",".join(triggers), "--format", "json",
                                           "--device", "cpu"])
        runs[name] = (result.exit_code, json.loads(result.stdout))
    code, data = runs["por"]
    assert code == 1
    flagged = {h["trigger"] for h in data["hijacked"]}
    assert len(flagged) >= len(triggers) // 2, data["hijacked"]
    for hijack in data["hijacked"]:  # the listed heads come strongest first and are that trigger's top heads
        z = np.array(data["stats"]["triggers"][hijack["trigger"]])
        listed = [(h["layer"], h["head"]) for h in hijack["heads"]]
        top = np.argsort(-z, axis=None)[: len(listed)]
        assert listed == [divmod(int(i), z.shape[1]) for i in top]
    code, data = runs["clean"]
    assert code == 0 and data["hijacked"] == []
    assert max(np.max(z) for z in data["stats"]["triggers"].values()) < data["threshold"]
