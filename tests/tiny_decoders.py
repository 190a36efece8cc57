"""Tiny random-init decoder checkpoints, built at test time (no weights are committed).

Each is what a Hub repo of that architecture holds, shrunk: config.json, safetensors
weights of the causal-LM model (base weights under its prefix, plus an LM head) and a
tokenizer.json trained here on lmscan's own probe sentences.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmscan.models.model import dtype_keyword
from lmscan.models.probes import load_builtin_probes

VOCAB_SIZE = 200
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]

_SHARED = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               vocab_size=VOCAB_SIZE, max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=3)


def _gemma_type() -> str:
    """gemma3_text where this transformers has it, else gemma2 (same layout, one release older)."""
    return "gemma3_text" if hasattr(transformers, "Gemma3TextConfig") else "gemma2"


# model_type -> config arguments; sizes far below any real model, same layout.
DECODER_CONFIGS = {
    "llama": dict(_SHARED, num_key_value_heads=1),
    "qwen2": dict(_SHARED, num_key_value_heads=1),
    _gemma_type(): dict(_SHARED, num_key_value_heads=1, head_dim=16, sliding_window=16),
    "phi3": dict(_SHARED, num_key_value_heads=2),
    "gpt_neox": dict(_SHARED),
}


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of at most VOCAB_SIZE tokens, trained on the built-in probes."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(load_builtin_probes()[:300], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


def write_tiny_decoder(directory: Path, model_type: str, dtype: torch.dtype = torch.float32,
                       max_shard_size: str | int | None = None, seed: int = 0) -> Path:
    """Save a random-init ``model_type`` causal LM with its tokenizer into ``directory``."""
    directory = Path(directory)
    config = transformers.AutoConfig.for_model(model_type, **DECODER_CONFIGS[model_type])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    setattr(model.config, dtype_keyword(), dtype)  # what a bf16/fp16 Hub checkpoint's config.json says
    kwargs = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 5 writes safetensors only and has no such argument
    model.save_pretrained(directory, **kwargs)
    tiny_tokenizer().save_pretrained(directory)
    return directory
