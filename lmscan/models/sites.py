"""Feature sites: where lmscan reads the vector a task-agnostic backdoor controls.

A site turns one forward pass into one vector per input:
  cls     last hidden state of the first token ([CLS] / <s>)          POR, NeuBA (paper)
  pooler  the model's pooler output (dense + tanh over [CLS])         released NeuBA models
  mask    last hidden state at the [MASK] token of a prompt template  BToP
  tokens  mean of the last hidden states over real tokens             POR-NER (every token)
  last    last hidden state of the last real token                    decoder models
  next    last hidden state at the end of a generation prompt (decoders): where the
          first token of the reply is predicted. A base model reads the raw text; a model
          whose tokenizer has a chat template reads the text as the user's turn, followed
          by the template's generation prompt.
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

SITES = ("cls", "pooler", "mask", "tokens", "last", "next", "embedding", "label")

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


def chat_template_of(tokenizer) -> str | None:
    """The tokenizer's default chat template, or None for a base model."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one, if any
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def generation_prompts(tokenizer, texts: list[str]) -> list[str]:
    """``texts`` as the ``next`` site reads them: raw for a base model; for a chat model each
    text as the user's turn of the chat template, with the generation prompt after it.

    The template is checked first (lmscan.models.chat_template, parse only) and one that
    reaches Python internals is never rendered; a clean one is rendered by transformers in
    jinja2's immutable sandbox."""
    template = chat_template_of(tokenizer)
    if template is None:
        return list(texts)
    from jinja2 import TemplateError  # noqa: PLC0415

    from lmscan.models.chat_template import check_template  # noqa: PLC0415

    try:
        hits = check_template(template)
    except TemplateError as exc:
        raise CannotAssess(f"the next site needs the chat template, which does not parse ({exc})") from None
    if hits:
        raise CannotAssess(f"the next site needs the chat template, which {hits[0].why} (LMS005); lmscan does not "
                           "render it")
    try:
        return [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True) for text in texts]
    except Exception as exc:  # noqa: BLE001 - TemplateError, SecurityError, a template that raises on purpose
        raise CannotAssess(f"the next site needs the chat template, which does not render a user turn "
                           f"({type(exc).__name__}: {exc})") from None


def site_texts(tokenizer, texts: list[str], site: str) -> list[str]:
    if site == "next":
        return generation_prompts(tokenizer, texts)
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
        # A rendered chat prompt already holds the template's special tokens (its BOS among them).
        add_special_tokens=not (site == "next" and chat_template_of(tokenizer) is not None),
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
    if site in ("last", "next"):  # next differs in its input (the generation prompt), not in where it reads
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
