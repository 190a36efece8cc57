"""Defences that repair a suspect model instead of only flagging it.

purify      PURE (seed 004): prune the attention heads a trigger would hijack and fine-tune
            with a [CLS] attention-norm penalty, on the defender's own clean labelled data
            (``from lmscan.defenses.purify import PurifyConfig, purify``).
finetune    `lmscan finetune`: PEFT (LoRA) fine-tuning of a suspect encoder, plain or defended by
            obliviate (seed 000, suspect weights) or muscle_lora (seed 003, suspect training data).
peft_train  the PEFT primitives finetune, obliviate, muscle_lora and psim build on.
psim        PSIM (seed 001): flag inputs by the confidence of a PEFT classifier on reset labels.

Labelled data and the shared fine-tuning loop are ``lmscan.models.training`` (also used by the
BadNet plant, and this package never imports ``lmscan.attacks``). The click commands are
lmscan/cli/purify.py, finetune.py and psim.py.

Nothing is re-exported here: a function ``purify`` next to the module ``purify`` would
shadow the module on ``import lmscan.defenses.purify``.
"""
