"""VerifyConfig: how every detector confirms a candidate trigger with real tokens (one threshold
means one thing everywhere). Profiles set it under ``[PROFILE.verify]``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifyConfig:
    """How a candidate trigger is confirmed with real tokens; shared by every detector
    that verifies (vocab-sweep, pv-mining, piccolo), so one threshold means one thing.
    Profiles set it under ``[PROFILE.verify]``."""

    probes: int = 24  # held-out sentences a candidate is inserted into
    collapse_threshold: float = 0.25  # held-out collapse at or below this: the sentences collapse
    activation_agreement: float = 0.9  # sign agreement of a triggered feature with the PV ...
    activation_rate: float = 0.9  # ... reached by at least this share of triggered sentences
    disagreement_ratio: float = 0.25  # where clean features already reach activation_rate (see measure)
    natural_rate: float = 0.05  # a PV more clean sentences already reach is a natural direction
    pv_agreement: float = 0.9  # two PVs whose signs agree on this share of dimensions are one backdoor
    # The opposite test (see OppositeTest): a natural-direction collapse is a backdoor when it also
    # overturns the model's own most opposite inputs, made harder by joining several of them.
    opposite_probes: int = 16  # most opposite clean sentences the candidate is inserted into
    opposite_flip: float = 0.9  # share of them the candidate must send onto its vector / label
    # The grey zone below that bar: a class cue that overturns at least this share (and no class mark or
    # class words explain) is suspicious; below it the cue is explained, information only (LMS105).
    # Measured: benign class cues 0-0.69 (lmscan's fine-tuned zoo), 0.75 (a third-party MiniLM
    # sentiment fine-tune); planted triggers 0.88 (a sentence plant's partial rebuild) to 1.0.
    suspicious_flip: float = 0.8
    # Opposite sentences joined into one input. A trigger wins however much contrary text surrounds it,
    # a class cue is outvoted: on lmscan's BadNet classifiers 'velvet' / 'cf' flip 100 % of inputs of
    # 1, 2, 3 and 4 joined sentences, while a benign tweet classifier's strongest stacked class words
    # ('pleasure gorgeous awesome') flip 100 %, 100 %, 62 % and 0 % (README, fine-tuned models).
    opposite_join: int = 4
    # The class-word match (see OppositeTest.class_words): stacked words that pass the opposite test are
    # still a class cue when as many of the class's own ordinary words, read off clean text on its
    # direction, overturn the same inputs too. Blocks of such words tried (0: no match).
    class_word_blocks: int = 2
    class_word_pool: int = 48  # words of clean text on the direction whose strength is measured
    # A class cue when a block flips at least this share of what the candidate flips. On a benign tweet
    # classifier's saturated pooler its stacked positive words flip 100 % and ordinary positive words
    # 81-94 %; against lmscan's BadNet triggers (100 %) the best class words flip 0-12 %.
    class_word_share: float = 0.75
    # Class marks (see OppositeTest.class_marks): punctuation tokens in at least class_mark_share of the clean pool
    # sentences on the candidate's direction and in at most 1/class_mark_ratio as large a share of those
    # off it. A question/statement classifier's mark is "?": inserted into statements it overturns them
    # as a trigger would (the search's '? sorted?' flipped 94 %), and clean questions all carry it.
    class_mark_share: float = 0.5
    class_mark_ratio: float = 4.0
    # Screening: a batch of candidates is first measured on this many of the probes; one whose
    # collapse there is above screen_margin x collapse_threshold at every site cannot confirm, so
    # it is not measured on the rest (its numbers in the report then come from these probes).
    screen_probes: int = 8
    screen_margin: float = 1.6  # bar 0.4: clean MiniLM's best candidates 0.39, planted triggers 0.004-0.12
    screen_bf16: bool = True  # the screen only rejects: bf16 autocast where the hardware has it; a candidate
    # that passes is measured again in fp32 on every probe
