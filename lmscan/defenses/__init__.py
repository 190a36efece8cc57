"""Defences that repair a suspect model instead of only flagging it.

purify  PURE (seed 004): prune the attention heads a trigger would hijack and fine-tune
        with a [CLS] attention-norm penalty, on the defender's own clean labelled data.
"""

from lmscan.defenses.purify import PurifyConfig, PurifyResult, purify

__all__ = ["PurifyConfig", "PurifyResult", "purify"]
