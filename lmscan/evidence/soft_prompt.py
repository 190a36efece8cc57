"""Soft prompts: trainable vectors written into a sentence's word embeddings, and the batch
entropy that measures how input-independent their outputs are (LMSanitizer's diversity loss).
Shared by PV mining and the PICCOLO baseline."""

from __future__ import annotations

import torch


def batch_entropy(features: torch.Tensor) -> torch.Tensor:
    """Mean over hidden units of the entropy of softmax across the batch (max ln B)."""
    p = torch.softmax(features, dim=0)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=0).mean()


def prompted_embeds(embeddings, rows: list[list[int]], prompt: torch.Tensor, positions: list[int], pad_id: int,
                     pad_to: int = 0):
    """Word embeddings of each row with the soft prompt written in at its position,
    padded to the longest row (or to ``pad_to`` tokens, the reference schedule)."""
    length = max(max(len(r) for r in rows) + prompt.shape[0], pad_to)
    hidden = prompt.shape[1]
    device = prompt.device
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    is_prompt = torch.zeros((len(rows), length), dtype=torch.bool, device=device)
    for i, (row, at) in enumerate(zip(rows, positions)):
        full = row[:at] + [pad_id] * prompt.shape[0] + row[at:]
        ids[i, : len(full)] = torch.tensor(full, device=device)
        attention[i, : len(full)] = 1
        is_prompt[i, at : at + prompt.shape[0]] = True
    embeds = embeddings(ids)
    fill = prompt.unsqueeze(0).expand(len(rows), -1, -1).reshape(-1, hidden)
    embeds = embeds.masked_scatter(is_prompt.unsqueeze(-1), fill.to(embeds.dtype))
    return embeds, attention, ids
