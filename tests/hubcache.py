"""Build a Hugging Face Hub cache folder on disk, laid out the way huggingface_hub writes it.

    <cache>/models--<org>--<name>/blobs/<digest>          file contents
    <cache>/models--<org>--<name>/snapshots/<commit>/<f>  symlinks into blobs (copies where
                                                         symlinks are unavailable)
    <cache>/models--<org>--<name>/refs/<branch>           the commit sha, no newline

Tests point HF_HUB_CACHE at such a folder and resolve Hub ids fully offline.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

MINILM_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "model.safetensors",
)


def fake_commit(repo_id: str, salt: str = "") -> str:
    """A stable 40-hex commit id for a test repo."""
    return hashlib.sha1(f"{repo_id}:{salt}".encode()).hexdigest()


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def make_hf_cache(
    cache_dir: Path,
    repo_id: str,
    files: Mapping[str, Path | bytes],
    commit: str | None = None,
    refs: Iterable[str] = ("main",),
) -> Path:
    """Add one snapshot of ``repo_id`` holding ``files`` (name -> source path or bytes).

    Returns the snapshot folder. ``refs`` (branches or tags) are pointed at the commit.
    """
    commit = commit or fake_commit(repo_id)
    repo = repo_folder(cache_dir, repo_id)
    blobs = repo / "blobs"
    snapshot = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)

    for name, source in files.items():
        data_path = None
        if isinstance(source, bytes):
            digest = hashlib.sha256(source).hexdigest()
        else:
            data_path = Path(source)
            digest = _file_digest(data_path)
        blob = blobs / digest
        if not blob.exists():
            if data_path is None:
                blob.write_bytes(source)
            else:
                shutil.copyfile(data_path, blob)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        try:
            os.symlink(os.path.relpath(blob, target.parent), target)
        except (OSError, NotImplementedError):
            shutil.copyfile(blob, target)

    for ref in refs:
        ref_file = repo / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)
    return snapshot


def minilm_cache_files(model_dir: Path, names: Iterable[str] = MINILM_FILES) -> dict[str, Path]:
    """The files of the bundled MiniLM a Hub snapshot of it would hold."""
    return {name: Path(model_dir) / name for name in names}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
