"""Reading features: several sites from one forward pass, token insertion, word starts, and
the pieces a made-up word is spelled from."""

from __future__ import annotations

import numpy as np
import torch

from lmscan.models.sites import pad_rows, read_site, site_texts


class SiteReader:
    """Tokenise probes once (with the mask template when the mask site is read) and
    read every requested site from a single forward pass."""

    def __init__(self, model, tokenizer, sites: list[str], device, max_length: int = 64):
        self.model, self.tokenizer, self.sites, self.device = model, tokenizer, list(sites), device
        self.max_length = max_length

    @property
    def longest_input(self) -> int:
        """The most tokens the model takes: its position table, less the two rows RoBERTa-style
        models reserve before the first position (harmless elsewhere), or the tokenizer's limit."""
        positions = (getattr(self.model.config, "max_position_embeddings", None) or 514) - 2
        limit = getattr(self.tokenizer, "model_max_length", None) or positions
        return min(positions, limit)

    def encode_text(self, text: str) -> str:
        """The text as every site reads it: in the mask prompt when the mask site is among them."""
        return site_texts(self.tokenizer, [text], "mask")[0] if "mask" in self.sites else text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(self.encode_text(text), truncation=True, max_length=self.max_length)["input_ids"]

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_rows(rows, self.tokenizer.pad_token_id or 0, self.device)

    def read(self, outputs, site: str, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        mask_positions = (ids == self.tokenizer.mask_token_id).float().argmax(1) if site == "mask" else None
        return read_site(outputs, site, attention, mask_positions)

    def forward_with_slots(self, rows: list[list[int]], places: list[int], length: int):
        """The model's outputs on ``rows`` with a zero vector, differentiable, added to the embeddings
        of the ``length`` tokens from each row's place (a block inserted there): the gradient of a
        loss with respect to those vectors ranks replacement tokens for each block position.
        Returns (outputs, ids, attention mask, the vectors: length x hidden)."""
        ids, attention = self.pad(rows)
        embeds = self.model.get_input_embeddings()(ids).detach()
        slots = torch.zeros(length, embeds.shape[-1], device=embeds.device, requires_grad=True)
        positions = torch.tensor(places, device=ids.device)[:, None] + torch.arange(length, device=ids.device)
        row_index = torch.arange(len(rows), device=ids.device)[:, None].expand_as(positions)
        delta = torch.zeros_like(embeds).index_put((row_index.reshape(-1), positions.reshape(-1)),
                                                   slots.repeat(len(rows), 1))
        return self.model(inputs_embeds=embeds + delta, attention_mask=attention), ids, attention, slots

    @torch.no_grad()
    def features(self, rows: list[list[int]], batch_size: int = 256) -> dict[str, np.ndarray]:
        # Rows run shortest first, so a batch pads to rows of about its own length
        # (held-out sentences range from a few tokens to 64); results keep the input order.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        chunks: dict[str, list[np.ndarray]] = {s: [] for s in self.sites}
        for start in range(0, len(rows), batch_size):
            ids, attention = self.pad([rows[i] for i in order[start : start + batch_size]])
            out = self.model(input_ids=ids, attention_mask=attention)
            for site in self.sites:
                chunks[site].append(self.read(out, site, ids, attention).float().cpu().numpy())
        restore = np.argsort(order, kind="stable")
        return {s: np.concatenate(v)[restore] for s, v in chunks.items()}


def pairwise_mse(features: np.ndarray) -> float:
    """Mean squared distance between all pairs of rows, per dimension."""
    n = features.shape[0]
    if n < 2:
        return 0.0
    centred = features - features.mean(axis=0, keepdims=True)
    # sum over pairs |x_i - x_j|^2 = n * sum_i |x_i - mean|^2
    return float(2 * n * (centred**2).sum() / (n * (n - 1)) / features.shape[1])


def word_starts(tokenizer, row: list[int]) -> list[int]:
    """Token positions where a word begins (not inside a word, not before [CLS])."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(row)
    starts = [i for i, (tok, tid) in enumerate(zip(tokens, row)) if i > 0 and tid not in special
              and not tok.startswith("##")]
    return starts or [1]


def spelling_pieces(tokenizer, token_ids: list[int], first_chars: int) -> tuple[list[int], list[int]]:
    """Of ``token_ids``: the word-initial pieces of at most ``first_chars`` letters, and the
    letter-only continuation pieces (WordPiece '##', or BPE / SentencePiece pieces without the
    word-start mark) -- what a made-up word such as 'kups' (ku ##ps) is spelled from."""
    token_ids = [int(i) for i in token_ids]
    tokens = tokenizer.convert_ids_to_tokens(token_ids)
    if any(t.startswith("##") for t in tokens):
        split = lambda t: (False, t[2:]) if t.startswith("##") else (True, t)  # noqa: E731
    else:
        mark = max("\u0120\u2581", key=lambda m: sum(t.startswith(m) for t in tokens))  # BPE 'Ġ', SentencePiece
        split = lambda t: (True, t[1:]) if t.startswith(mark) else (False, t)  # noqa: E731
    first, rest = [], []
    for index, token in zip(token_ids, tokens):
        initial, letters = split(token)
        if letters.isascii() and letters.isalpha():
            if not initial:
                rest.append(index)
            elif len(letters) <= first_chars:
                first.append(index)
    return first, rest


def insert_ids(row: list[int], token_ids, at: int) -> list[int]:
    return row[:at] + list(token_ids) + row[at:]


def sweep_vocabulary(tokenizer) -> np.ndarray:
    """Token ids worth inserting: everything but special and placeholder tokens."""
    special = set(tokenizer.all_special_ids)
    keep = [index for token, index in tokenizer.get_vocab().items()
            if index not in special and not token.startswith(("[unused", "<unused"))]
    return np.array(sorted(keep))
