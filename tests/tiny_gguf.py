"""Tiny GGUF files written at test time with the gguf package's own GGUFWriter.

A llama of the same shrunken sizes as tests/tiny_decoders.py, random float32 weights, and a
sentencepiece-style vocabulary (tokens, scores, types) made of lmscan's probe words, as
llama.cpp's converter writes them. ``corrupt_*`` break a written file the way a damaged or
crafted file is broken, by patching its bytes (what a reader sees, not a mock of one).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from lmscan.models.probes import load_builtin_probes

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 32, 2, 2, 1, 64, 64
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB = 200


def _vocabulary() -> list[str]:
    words: dict[str, None] = {}
    for sentence in load_builtin_probes()[:300]:
        for word in sentence.split():
            words.setdefault("\u2581" + word.strip(".,?!;:\"'()").lower(), None)
    letters = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return SPECIALS + letters + [w for w in words if len(w) > 1][: VOCAB - len(SPECIALS) - len(letters)]


def write_tiny_gguf(path: Path, chat_template: str | None = None, seed: int = 0) -> Path:
    """A random-init llama GGUF of ~70 KB at ``path`` (what llama.cpp's converter writes, shrunk)."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens = _vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(SPECIALS) + [-float(i) for i in range(len(tokens) - len(SPECIALS))])
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head_dim = HIDDEN // HEADS
    writer.add_tensor("token_embd.weight", weight(len(tokens), HIDDEN))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.add_tensor("output.weight", weight(len(tokens), HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
