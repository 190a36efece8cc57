"""The detector contract: what a detector declares, what it is given, what it returns.

A detector is a class with
  name       the name users pass to ``--detectors``
  Config     a frozen dataclass; its defaults are the one place the detector's
             defaults live (profiles in rules/profiles.toml list only what differs,
             under ``[PROFILE.<name>]``)
  rule_ids   the rule ids it emits; their title, severity and verdict are data in
             rules/rule_catalog.toml
  can_clear  whether finding nothing means something: a behavioural detector that
             searched a site to its budget can clear it; static rules and baselines
             can only flag
  sites      the feature sites it can read (empty: it reads the weights, not a site)
  families   the model families ("encoder", "decoder") it is verified on; on any other
             family the scan skips it with a note instead of letting it clear sites
             whose features it was never checked against
and one method ``run(ctx) -> DetectorRun``. Detectors never print; they report
progress through ``ctx.progress(done, total, info)``. Registering one is one line in
lmscan/detectors/__init__.py (or ``register(cls)`` at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from lmscan.findings import DetectorRun

# The one progress-callback shape: (stage, done, total, info).
ProgressFn = Callable[[str, int, int, str], None]


@dataclass
class ScanContext:
    """Everything a detector run is given."""

    loaded: Any  # lmscan.models.LoadedModel
    sites: list[str]  # the sites to scan that this detector supports
    fit: list[str]  # probe sentences detectors may fit or sweep on
    heldout: list[str]  # disjoint probe sentences used only for verification
    config: Any  # the detector's own Config instance
    verify: Any  # lmscan.evidence.verify_config.VerifyConfig, shared by every detector that verifies
    seed: int = 0
    spare: list[str] = field(default_factory=list)  # probes in neither set (a longer schedule may fit on them)
    earlier: list[DetectorRun] = field(default_factory=list)  # runs of the detectors before this one
    candidates: list[str] = field(default_factory=list)  # trigger candidates a caller supplies (lmscan heads)
    resume: DetectorRun | None = None  # an earlier run of this detector to continue from (search from a report)
    known_pvs: dict | None = None  # site -> PVs found before (search mode steers away from them)
    reference: Any = None  # a full checkpoint's base (a ResolvedModel: --base, model card, inferred), not loaded
    base: Any = None  # an adapter's base (a ResolvedModel): what it was merged into, not loaded
    stage: str = ""  # name shown in progress
    on_progress: ProgressFn | None = None

    @property
    def device(self):
        return self.loaded.device

    def progress(self, done: int, total: int, info: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(self.stage, int(done), int(total), info)


class Detector:
    """Base class of every detector (see the module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    rule_ids: ClassVar[tuple[str, ...]] = ()
    can_clear: ClassVar[bool] = False
    sites: ClassVar[tuple[str, ...]] = ()
    families: ClassVar[tuple[str, ...]] = ("encoder", "decoder")
    # What a user reads in `lmscan check --help`-style listings and the README.
    summary: ClassVar[str] = ""

    def run(self, ctx: ScanContext) -> DetectorRun:  # pragma: no cover - the contract
        raise NotImplementedError
