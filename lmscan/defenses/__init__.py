"""Defences that repair a suspect model instead of only flagging it.

purify  PURE (seed 004): prune the attention heads a trigger would hijack and fine-tune
        with a [CLS] attention-norm penalty, on the defender's own clean labelled data
        (``from lmscan.defenses.purify import PurifyConfig, purify``).
task    labelled data, the shared fine-tuning loop and the label flip rate.

Nothing is re-exported here: a function ``purify`` next to the module ``purify`` would
shadow the module on ``import lmscan.defenses.purify``.
"""
