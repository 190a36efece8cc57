"""Feature sites: where lmscan reads the vector a task-agnostic backdoor controls.

A site turns one forward pass into one vector per input:
  cls     last hidden state of the first token ([CLS] / <s>)          POR, NeuBA (paper)
  pooler  the model's pooler output (dense + tanh over [CLS])         released NeuBA models
  mask    last hidden state at the [MASK] token of a prompt template  BToP
  tokens  mean of the last hidden states over real tokens             POR-NER (every token)
  last    last hidden state of the last real token                    decoder models
  embedding  the sentence-transformers embedding (its pooling, normalised when it says so)
  label   the class probabilities of the checkpoint's classification head
The last two exist when the checkpoint ships them (lmscan.models.scan_model).

Inputs for the ``mask`` site are wrapped in a fixed prompt template so that every
sentence carries exactly one mask token; plant and scan use the same template.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmscan.errors import CannotAssess

SITES = ("cls", "pooler", "mask", "tokens", "last", "embedding", "label")

# The prompt the mask site reads. BToP-style backdoors fire for any prompt, so a
# fixed neutral template is enough to observe them.
MASK_TEMPLATE = "{text} It was {mask}."


@dataclass
class SiteBatch:
    """Tokenised inputs plus what a site needs to pick its vector."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask_positions: torch.Tensor | None  # index of the mask token per row (mask site)

    def to(self, device) -> "SiteBatch":
        return SiteBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.mask_positions is None else self.mask_positions.to(device),
        )


def prepare_tokenizer(tokenizer) -> None:
    """Make batching work the same way for every family (right padding, a pad token)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def site_texts(tokenizer, texts: list[str], site: str) -> list[str]:
    if site != "mask":
        return list(texts)
    if tokenizer.mask_token is None:
        raise CannotAssess("this tokenizer has no mask token, so the mask site cannot be read")
    return [MASK_TEMPLATE.format(text=t, mask=tokenizer.mask_token) for t in texts]


def encode(tokenizer, texts: list[str], site: str, max_length: int = 128) -> SiteBatch:
    """Tokenise ``texts`` for ``site`` (adds the mask template for the mask site)."""
    prepare_tokenizer(tokenizer)
    enc = tokenizer(
        site_texts(tokenizer, texts, site),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    positions = mask_positions(enc["input_ids"], enc["attention_mask"], tokenizer.mask_token_id) if site == "mask" else None
    return SiteBatch(enc["input_ids"], enc["attention_mask"], positions)


def pad_rows(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded to the longest: (input ids, attention mask)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    # One flat copy instead of a tensor per row: the sweep pads ~20 000 short rows a scan.
    attention = np.arange(int(lengths.max())) < lengths[:, None]
    ids = np.full(attention.shape, pad_id, dtype=np.int64)
    ids[attention] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids).to(device), torch.from_numpy(attention.astype(np.int64)).to(device)


def mask_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Index of the mask token in each row."""
    is_mask = input_ids == mask_token_id
    # Truncation can cut the template off a very long sentence: fall back to the
    # last real token so the batch stays usable, rather than failing the scan.
    last_real = attention_mask.sum(dim=1) - 1
    return torch.where(is_mask.any(dim=1), is_mask.float().argmax(dim=1), last_real)


def read_site(outputs, site: str, attention_mask: torch.Tensor, mask_positions=None) -> torch.Tensor:
    """Pick the site's vector, shape (batch, hidden), from a base model's outputs."""
    hidden = outputs.last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if site == "cls":
        return hidden[:, 0]
    if site == "pooler":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise CannotAssess("this model has no pooler output")
        return pooled
    if site == "mask":
        if mask_positions is None:
            raise ValueError("the mask site needs mask positions")
        return hidden[rows, mask_positions]
    if site == "tokens":
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    if site == "last":
        return hidden[rows, attention_mask.sum(dim=1) - 1]
    if site == "embedding":
        if getattr(outputs, "embedding", None) is None:
            raise CannotAssess("this checkpoint has no sentence-transformers pooling")
        return outputs.embedding
    if site == "label":
        if getattr(outputs, "logits", None) is None:
            raise CannotAssess("this checkpoint has no classification head")
        return torch.softmax(outputs.logits.float(), dim=-1)
    raise ValueError(f"unknown site {site!r} (known: {', '.join(SITES)})")
