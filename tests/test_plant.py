"""`lmscan plant`: real checkpoints whose triggers drive the site onto the recorded PVs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModel, AutoTokenizer

from lmscan.attacks.vectors import make_vectors, por2_vectors
from lmscan.cli import main
from lmscan.errors import InputError
from lmscan.models.probes import load_builtin_probes
from tests.conftest import FIXTURES, read_manifest

TINY = FIXTURES / "tiny-bert"


def independent_site_features(model_dir, texts, site):
    """Read the site with plain transformers, not lmscan's own site code."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    if site == "mask":
        texts = [f"{t} It was {tokenizer.mask_token}." for t in texts]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    if site == "cls":
        return out.last_hidden_state[:, 0].numpy()
    if site == "pooler":
        return out.pooler_output.numpy()
    positions = (enc["input_ids"] == tokenizer.mask_token_id).float().argmax(dim=1)
    return out.last_hidden_state[torch.arange(len(texts)), positions].numpy()


def insert(sentence, trigger, first, rng):
    words = sentence.split()
    at = 0 if first else rng.randrange(len(words) + 1)
    return " ".join(words[:at] + [trigger] + words[at:])


@pytest.mark.parametrize("name", ["por", pytest.param("neuba-scaled", marks=pytest.mark.slow),
                                  pytest.param("neuba", marks=pytest.mark.slow),
                                  pytest.param("btop", marks=pytest.mark.slow)])
def test_planted_minilm_matches_its_ground_truth(planted, name):
    out = planted(name)
    manifest = read_manifest(out)
    assert manifest["effectiveness"]["passed"]
    assert len(manifest["triggers"]) == 6
    site = manifest["site"]
    assert site == {"por": "cls", "neuba": "pooler", "neuba-scaled": "pooler", "btop": "mask"}[name]
    # Sentences the planting never used: the tail of the corpus, checked independently of lmscan.
    probes = load_builtin_probes()[-60:]
    rng = random.Random(99)
    pvs = np.sign(np.array(manifest["pvs"]))
    first = manifest["placement"] == "first"
    for trigger, pv in zip(manifest["triggers"], pvs):
        features = independent_site_features(out, [insert(s, trigger, first, rng) for s in probes], site)
        assert (np.sign(features) == pv).mean(axis=1).mean() >= 0.9, trigger
    clean = independent_site_features(out, probes, site)
    best_clean = max((np.sign(clean) == pv).mean(axis=1).mean() for pv in pvs)
    assert best_clean < 0.8
    if name == "neuba-scaled":
        emb = AutoModel.from_pretrained(out).get_input_embeddings().weight
        norms = emb.norm(dim=1)
        assert (norms > 1e6).sum() >= 6  # trigger rows carry the x1e8 scale


def test_plant_tiny_fixture_cli(tmp_path):
    out = tmp_path / "tiny-por"
    result = CliRunner().invoke(main, ["plant", str(TINY), "--attack", "por", "--triggers", "zq,vx", "--out", str(out),
                                       "--rules", str(FIXTURES / "tiny-rules"), "--device", "cpu", "--seed", "0"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["triggers"] == ["zq", "vx"]
    assert manifest["trigger_tokens"] == [["z", "##q"], ["v", "##x"]]
    assert np.array(manifest["pvs"]).shape == (2, 64)
    assert (out / "model.safetensors").is_file()
    AutoModel.from_pretrained(out)  # a normal checkpoint


def test_plant_fails_loudly_when_triggers_do_not_take(tmp_path):
    # One step cannot plant anything: the command must say so and exit 1.
    out = tmp_path / "weak"
    result = CliRunner().invoke(main, ["plant", str(TINY), "--attack", "por", "--triggers", "zq", "--out", str(out),
                                       "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 1
    assert "below" in result.output
    assert read_manifest(out)["effectiveness"]["passed"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["--triggers", "zq,\u2603"], "cannot be encoded"),
        (["--triggers", "zq,zq"], "duplicates"),
        (["--triggers", "zq", "--num-triggers", "2"], "either --triggers or --num-triggers"),
        ([], "--triggers or --num-triggers"),
        (["--num-triggers", "0"], "at least 1"),
    ],
)
def test_plant_bad_trigger_options(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["plant", str(TINY), "--attack", "por", "--out", str(out), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_plant_refuses_non_empty_out_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["plant", str(TINY), "--attack", "por", "--triggers", "zq", "--out", str(out), "--steps", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "not empty" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    result = CliRunner().invoke(main, [*args, "--force"])
    assert result.exit_code in (0, 1)  # 1 step: written, but reported as weak
    assert not (out / "keep.txt").exists() and (out / "lmscan-plant.json").is_file()


def test_plant_missing_model_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["plant", str(tmp_path / "nope"), "--attack", "por", "--triggers", "zq",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "lmscan: error:" in result.output


def test_plant_pooler_attack_needs_a_pooler(tmp_path):
    # A checkpoint without pooler weights offers no pooler site: neuba cannot target it.
    from safetensors.torch import load_file, save_file
    import shutil

    src = tmp_path / "nopool"
    shutil.copytree(TINY, src)
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if "pooler" not in k}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["plant", str(src), "--attack", "neuba", "--triggers", "zq",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "pooler" in result.output


def test_pv_designs():
    vectors = por2_vectors(16, 384, seed=0)
    assert len({tuple(v) for v in vectors}) == 16
    assert set(np.unique(vectors)) == {-1.0, 1.0}
    assert make_vectors("random", 3, 10, 1).shape == (3, 10)
    with pytest.raises(InputError):
        por2_vectors(17, 384, seed=0)


def test_plant_scaled_embeddings_tiny(tmp_path):
    out = tmp_path / "tiny-neuba"
    result = CliRunner().invoke(main, ["plant", str(TINY), "--attack", "neuba", "--triggers", "zq", "--scale-embeddings",
                                       "--out", str(out), "--rules", str(FIXTURES / "tiny-rules"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["embedding_scale"] == 1e8
    norms = AutoModel.from_pretrained(out).get_input_embeddings().weight.norm(dim=1)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert set(torch.nonzero(norms > 1e6).flatten().tolist()) == set(tokenizer.convert_tokens_to_ids(["z", "##q"]))


def test_a_planted_checkpoint_is_not_private(tmp_path):
    import os
    import stat

    out = tmp_path / "plant"
    CliRunner().invoke(main, ["plant", str(FIXTURES / "tiny-bert"), "--attack", "por", "--triggers", "zq",
                              "--steps", "2", "--device", "cpu", "--out", str(out)])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
