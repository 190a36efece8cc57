"""The model a scan runs: the encoder, plus what the checkpoint ships on top of it.

A fine-tuned classifier ships its ``*ForSequenceClassification`` head, which decides
the label users act on; a sentence-transformers checkpoint ships its pooling. One
forward pass of :class:`ScanModel` gives every site: the encoder's states (cls,
pooler, mask, tokens, last), the pooled ``embedding`` and the head's ``logits`` (the
``label`` site), so adding those sites costs no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SiteOutputs:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # the classification head's, when the checkpoint has one
    embedding: torch.Tensor | None = None  # the sentence-transformers embedding, when it has the layout
    attentions: Any = None


class ScanModel(torch.nn.Module):
    """Encoder (+ classifier sharing it) (+ pooling); forward returns SiteOutputs."""

    def __init__(self, encoder, classifier=None, pooling=None):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier  # the full *ForSequenceClassification model; its base model is ``encoder``
        self.pooling = pooling

    @property
    def config(self):
        return self.encoder.config

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def set_attn_implementation(self, implementation: str) -> None:
        (self.classifier or self.encoder).set_attn_implementation(implementation)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> SiteOutputs:
        if self.classifier is not None:
            captured = {}
            # The head's forward runs the encoder inside; its output is caught on the way.
            handle = self.encoder.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))
            try:
                logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask,
                                         inputs_embeds=inputs_embeds, **kwargs).logits
            finally:
                handle.remove()
            base = captured["out"]
        else:
            base = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                **kwargs)
            logits = None
        hidden = base.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        embedding = self.pooling(hidden, attention_mask) if self.pooling is not None else None
        return SiteOutputs(hidden, getattr(base, "pooler_output", None), logits, embedding,
                           getattr(base, "attentions", None))


def transformer_of(model):
    """The bare transformer of a loaded model: a ScanModel's encoder, else the model itself
    (for hidden states, which the sites do not carry)."""
    return model.encoder if isinstance(model, ScanModel) else model
