"""PURE-style head profiling: the `attention` detector and `lmscan heads`."""

from __future__ import annotations

import json
import xml.dom.minidom

import numpy as np
import pytest
from click.testing import CliRunner

from lmscan.cli import main
from lmscan.detectors.attention import cls_attention_variance
from lmscan.loading import load_model, resolve_model
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
    ratios = np.array(data["stats"]["triggers"]["vx"])
    assert ratios.shape == (2, 4)
    assert (ratios.max() >= data["threshold"]) == bool(expected)
    assert xml.dom.minidom.parse(str(plot)).getElementsByTagName("rect").length == 8


def test_heads_plot_must_be_svg(tmp_path):
    result = CliRunner().invoke(main, ["heads", str(FIXTURES / "tiny-bert"), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and ".svg" in result.output
