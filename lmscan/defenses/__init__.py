"""Defences that repair a suspect model instead of only flagging it.

purify  PURE (seed 004): prune the attention heads a trigger would hijack and fine-tune
        with a [CLS] attention-norm penalty, on the defender's own clean labelled data
        (``from lmscan.defenses.purify import PurifyConfig, purify``).
peft_train  `lmscan finetune`: PEFT (LoRA) fine-tuning of a suspect encoder, plain or defended by
        obliviate (seed 000, suspect weights) or muscle_lora (seed 003, suspect training data).
psim    PSIM (seed 001): flag inputs by the confidence of a PEFT classifier on reset labels.
Their click commands are lmscan/cli/purify.py, finetune.py and psim.py.

Nothing is re-exported here: a function ``purify`` next to the module ``purify`` would
shadow the module on ``import lmscan.defenses.purify``.
"""
