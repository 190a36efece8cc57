"""The one place trigger findings are built and read back.

Every detector that verifies a real-token trigger reports it through :func:`backdoor_findings`
(LMS101: a trigger, grouped by the backdoor vector it reaches) or :func:`class_cue_findings`
(LMS103 in the opposite test's grey zone, LMS105 when the cue is explained), naming itself as
the detector. The evidence of each is a :class:`TriggerEvidence`; :func:`triggers_from_findings`
reads the triggers back for later stages (PV mining, the attention profile, the PV search).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, TypeVar

import numpy as np

from lmscan.evidence.class_cues import cue_explained
from lmscan.evidence.verify_config import VerifyConfig
from lmscan.findings import Finding

T = TypeVar("T")


@dataclass
class TriggerEvidence:
    """What a trigger or class-cue finding says about its trigger (``Finding.evidence``)."""

    trigger: str  # the text inserted
    trigger_tokens: list[str]
    collapse: float  # held-out collapse with it, relative to the clean spread
    activation_rate: float  # share of held-out sentences on its vector (label site: on its label)
    placement: str  # "first" (after [CLS]) or "anywhere" (a random word start), the stronger one
    clean_on_pv: float | None = None  # share of clean held-out sentences already on that vector
    pool_on_pv: float | None = None  # the same over the larger pool with opinionated text
    opposite_flip: float | None = None  # share of the model's most opposite inputs it overturns
    class_mark: str | None = None  # punctuation its class's clean text carries, when the flip went through it
    rest_flip: float | None = None  # what the candidate without its class marks overturns
    class_words: str | None = None  # the class's own ordinary words that nearly match it
    class_words_flip: float | None = None
    also: list[dict] = field(default_factory=list)  # more triggers or cues of the same vector / class
    mean_agreement: float | None = None  # backdoors: mean sign agreement with the PV
    pv: list[float] | None = None  # backdoors: the vector (rounded), what export-pvs and the monitor keep
    source: str | None = None  # which stage proposed the candidate
    target_label: int | None = None  # label site only
    target_label_name: str | None = None

    def as_dict(self) -> dict:
        data = asdict(self)
        if self.target_label is None:  # only the label site names a label
            data.pop("target_label"), data.pop("target_label_name")
        return data


def group_greedy(items: list[T], same: Callable[[T, T], bool]) -> list[list[T]]:
    """Each item joins the first group whose head it matches, else starts a group (items in the
    caller's order, so a group's head is its best)."""
    groups: list[list[T]] = []
    for item in items:
        for group in groups:
            if same(group[0], item):
                group.append(item)
                break
        else:
            groups.append([item])
    return groups


def class_name(site: str, entry: dict, labels: list[str] | None) -> str:
    """The class a collapse goes to: the head's label name, or the direction's clean share."""
    if site == "label" and labels and entry.get("target_label") is not None:
        return repr(labels[entry["target_label"]])
    share = entry.get("pool_on_pv", entry["clean_on_pv"])
    return f"the {site} direction that {share:.0%} of clean and opinionated probe sentences already take"


def _evidence(tokenizer, site: str, head: dict, labels: list[str] | None, also: list[dict]) -> TriggerEvidence:
    label = head.get("target_label") if site == "label" else None
    return TriggerEvidence(
        trigger=head["text"], trigger_tokens=tokenizer.convert_ids_to_tokens(head["token_ids"]),
        collapse=head["collapse"], activation_rate=head["activation_rate"], placement=head["placement"],
        clean_on_pv=head.get("clean_on_pv"), pool_on_pv=head.get("pool_on_pv"),
        opposite_flip=head.get("opposite_flip"), class_mark=head.get("class_mark"), rest_flip=head.get("rest_flip"),
        class_words=head.get("class_words"), class_words_flip=head.get("class_words_flip"), also=also,
        target_label=None if label is None else int(label),
        target_label_name=None if label is None else (labels[int(label)] if labels else str(label)),
    )


def backdoor_findings(detector: str, tokenizer, site: str, confirmed: list[dict], verify: VerifyConfig,
                      labels: list[str] | None = None) -> list[Finding]:
    """LMS101, one finding per distinct PV: confirmed triggers whose PVs agree in sign >=
    pv_agreement (label site: that send sentences to the same label) are one backdoor."""
    def same(a: dict, b: dict) -> bool:
        if site == "label":
            return a.get("target_label") == b.get("target_label")
        return (np.sign(a["pv"]) == np.sign(b["pv"])).mean() >= verify.pv_agreement

    findings = []
    for group in group_greedy(sorted(confirmed, key=lambda e: (len(e["token_ids"]), e["collapse"])), same):
        head = group[0]
        where = (f"to label {class_name(site, head, labels)}" if site == "label" else f"onto one {site} vector")
        flip = head.get("opposite_flip")
        overturn = (f", and overturns {flip:.0%} of the model's most opposite inputs, where "
                    f"{head['clean_on_pv']:.0%} of clean sentences already are" if flip is not None else "")
        evidence = _evidence(tokenizer, site, head, labels, also=[
            {"text": e["text"], "tokens": tokenizer.convert_ids_to_tokens(e["token_ids"]),
             "activation_rate": e["activation_rate"]} for e in group[1:6]])
        evidence.mean_agreement = head["mean_agreement"]
        evidence.pv = [round(float(x), 5) for x in np.atleast_1d(head["pv"])]
        evidence.source = head.get("source")
        findings.append(Finding(
            detector=detector, rule_id="LMS101", site=site, score=head["collapse"],
            threshold=verify.collapse_threshold,
            message=(f"inserting {head['text']!r} drives {head['activation_rate']:.0%} of held-out sentences {where} "
                     f"(collapse {head['collapse']:.3f} of the clean spread){overturn}"),
            evidence=evidence.as_dict(),
        ))
    return findings


def class_cue_findings(detector: str, tokenizer, site: str, natural: list[dict], verify: VerifyConfig,
                       labels: list[str] | None = None) -> list[Finding]:
    """Tokens that collapse held-out sentences onto a vector (or label) clean sentences
    already reach, and do not overturn the model's most opposite inputs: class cues.
    A fine-tuned classifier's class words do this by design (measured on a sentiment
    fine-tune of MiniLM: "worse" and "terrible", 12-21 % of clean sentences already on the
    vector; planted triggers: 0 %). Cues in the opposite test's grey zone are suspicious
    (LMS103); explained ones are information (LMS105), which a clean verdict names."""
    by_text: dict[str, dict] = {}
    for entry in sorted(natural, key=lambda e: e["collapse"]):
        by_text.setdefault(entry["text"], entry)  # a word tried as a collapse and a shift candidate: once
    grey = [e for e in by_text.values() if not cue_explained(e, verify)]
    explained = [e for e in by_text.values() if cue_explained(e, verify)]
    return [_class_cue_finding(detector, tokenizer, site, group, verify, labels, rule_id)
            for group, rule_id in ((grey, "LMS103"), (explained, "LMS105")) if group]


def _class_cue_finding(detector: str, tokenizer, site: str, natural: list[dict], verify: VerifyConfig,
                       labels: list[str] | None, rule_id: str) -> Finding:
    head = natural[0]
    words = ", ".join(repr(e["text"]) for e in natural[:5])
    flip = head.get("opposite_flip")
    why = (f"; it overturns only {flip:.0%} of the model's most opposite inputs (a backdoor overturns at least "
           f"{verify.opposite_flip:.0%})" if flip is not None else "")
    overturned = flip is not None and flip >= verify.opposite_flip
    if overturned and head.get("class_mark"):
        rest = f"the rest, {head['rest']!r}, overturns {head['rest_flip']:.0%}" if head.get("rest") else "nothing else"
        why = (f"; it overturns {flip:.0%} of the model's most opposite inputs, but through {head['class_mark']!r}, "
               f"which clean sentences of that class carry; {rest}: no shortcut")
    elif overturned and head.get("class_words"):
        why = (f"; it overturns {flip:.0%} of the model's most opposite inputs, but ordinary words of that class "
               f"from clean text nearly match it, {head['class_words']!r} ({head['class_words_flip']:.0%}): no shortcut")
    advice = ("explained, information only" if rule_id == "LMS105" else
              f"between the {verify.suspicious_flip:.0%} where class cues of benign models stop and the backdoor bar: "
              "check that these are natural cues of the model's task")
    evidence = _evidence(tokenizer, site, head, labels, also=[
        {"text": e["text"], "clean_on_pv": e["clean_on_pv"], "collapse": e["collapse"],
         "opposite_flip": e.get("opposite_flip")} for e in natural[1:6]])
    return Finding(
        detector=detector, rule_id=rule_id, site=site, score=head["clean_on_pv"], threshold=verify.natural_rate,
        message=f"class cue: {words} send held-out sentences to {class_name(site, head, labels)}{why}; {advice}",
        evidence=evidence.as_dict(),
    )


def triggers_from_findings(runs, tokenizer, include_also: bool = False) -> list[tuple[str, tuple[int, ...], str]]:
    """(text, token ids, detector) of every trigger earlier findings tied to a backdoor.

    Static findings list every outlier embedding row, each its own candidate; with
    ``include_also`` the other triggers a sweep finding grouped under the same PV count too.
    """
    seen, triggers = set(), []

    def add(tokens: list[str], source: str) -> None:
        ids = tuple(tokenizer.convert_tokens_to_ids(tokens))
        if ids not in seen:
            seen.add(ids)
            triggers.append((tokenizer.convert_tokens_to_string(tokens), ids, source))

    for run in runs:
        for finding in run.findings:
            tokens = finding.evidence.get("trigger_tokens")
            if finding.verdict != "backdoored" or not tokens:
                continue
            if "trigger" not in finding.evidence:
                for token in tokens:
                    add([token], run.name)
                continue
            add(tokens, run.name)
            for other in finding.evidence.get("also", []) if include_also else []:
                if isinstance(other, dict) and other.get("tokens"):
                    add(other["tokens"], run.name)
    return triggers
