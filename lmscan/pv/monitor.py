"""Runtime PV monitor: flag inputs whose feature lands on a backdoor's PV, and strip
the trigger (LMSanitizer §IV-D).

An input is flagged when, for some PV, the share of hidden units whose sign equals
the PV's sign exceeds T_match (0.8 in the paper; the .pvs file carries a value
calibrated on the model). ``purge`` deletes a sliding window of words (length 1, 2,
... up to ``max_window``, each segment of a sentence pair separately, together with
other occurrences of the same words), re-checks, and stops when the input is no
longer flagged; several triggers are removed one after another.

    from lmscan.pv.monitor import PVMonitor
    monitor = PVMonitor.load("model.pvs", model="org/name")
    monitor.check(["some text"])[0].flagged
    monitor.purge("some text with a trigger").text
    handle = monitor.attach(task_model)   # reads the feature of every forward pass
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import numpy as np
import torch

from lmscan.errors import InputError
from lmscan.models.sites import mask_positions, prepare_tokenizer, read_site
from lmscan.pv.pvs_file import PVSet, read_pvs

Text = str | tuple[str, str]
WORD = re.compile(r"\S+")


@dataclass
class MonitorResult:
    flagged: bool
    match: float  # best share of hidden units agreeing in sign with a PV
    pv: int | None  # id of that PV
    site: str | None


@dataclass
class PurgeResult:
    text: Text  # the cleaned input (the original when it was not flagged)
    flagged: bool  # before purging
    match: float
    still_flagged: bool  # after purging
    match_after: float
    removed: list[str] = field(default_factory=list)  # words deleted, in order
    forward_passes: int = 0


def sign_bits(pv) -> np.ndarray:
    return np.asarray(pv) >= 0


class FeatureReader:
    """Reads the features a set of (site, template) keys needs, one forward pass per template."""

    def __init__(self, loaded, keys, max_length: int = 256, batch_size: int = 64):
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        prepare_tokenizer(self.tokenizer)
        self.keys = list(dict.fromkeys(keys))
        self.max_length, self.batch_size = max_length, batch_size

    def _wrap(self, template: str | None, text: Text) -> tuple[str, str | None]:
        first, second = (text, None) if isinstance(text, str) else text
        if template is None:
            return first, second
        fill = lambda t: template.format(text=t, mask=self.tokenizer.mask_token)  # noqa: E731
        return (first, fill(second)) if second is not None else (fill(first), None)

    @torch.no_grad()
    def features(self, texts: list[Text]) -> dict[tuple, torch.Tensor]:
        out: dict[tuple, list[torch.Tensor]] = {k: [] for k in self.keys}
        for template in dict.fromkeys(t for _, t in self.keys):
            sites = [s for s, t in self.keys if t == template]
            for start in range(0, len(texts), self.batch_size):
                pairs = [self._wrap(template, t) for t in texts[start : start + self.batch_size]]
                firsts = [p[0] for p in pairs]
                seconds = [p[1] if p[1] is not None else "" for p in pairs]
                has_pair = any(p[1] is not None for p in pairs)
                enc = self.tokenizer(firsts, seconds if has_pair else None, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                outputs = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                for site in sites:
                    positions = (mask_positions(enc["input_ids"], enc["attention_mask"], self.tokenizer.mask_token_id)
                                 if site == "mask" else None)
                    out[(site, template)].append(read_site(outputs, site, enc["attention_mask"], positions))
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}


def match_ratios(features: dict[tuple, torch.Tensor], keys: list[tuple], bits: list) -> np.ndarray:
    """(inputs, PVs) share of hidden units whose sign equals the PV's sign."""
    columns = []
    for key, pv_bits in zip(keys, bits):
        positive = features[key] >= 0
        target = torch.as_tensor(np.asarray(pv_bits), device=positive.device)
        columns.append((positive == target[None]).float().mean(dim=1))
    return torch.stack(columns, dim=1).cpu().numpy()


class PVMonitor:
    def __init__(self, pvset: PVSet, loaded=None, t_match: float | None = None, max_window: int = 3,
                 max_removals: int = 3, batch_size: int = 64, max_length: int = 256):
        if not pvset.pvs:
            raise InputError("the .pvs file holds no PV, so there is nothing to monitor")
        self.pvset = pvset
        self.t_match = float(t_match if t_match is not None else pvset.t_match)
        if not 0.5 < self.t_match <= 1.0:
            raise InputError("t_match must be in (0.5, 1]")
        self.max_window, self.max_removals = max_window, max_removals
        self.keys = [p.key for p in pvset.pvs]
        self.bits = [p.signs for p in pvset.pvs]
        self.loaded = loaded
        self.reader = FeatureReader(loaded, self.keys, max_length, batch_size) if loaded is not None else None
        self.last_results: list[MonitorResult] = []  # from the latest forward pass of an attached model

    @classmethod
    def load(cls, pvs_path, model: str | None = None, device: str = "auto", revision: str | None = None,
             offline: bool | None = None, allow_model_mismatch: bool = False, **options) -> "PVMonitor":
        """Load a .pvs file and the model it was made for (or ``model``: e.g. a fine-tuned copy,
        which needs ``allow_model_mismatch``)."""
        from lmscan.models import load_model, resolve_model
        from lmscan.models.device import pick_device

        pvset = read_pvs(pvs_path)
        ref = model or pvset.model.get("ref")
        if not ref:
            raise InputError(f"{pvs_path} names no model; pass one")
        resolved = resolve_model(ref, revision=revision, offline=offline)
        expected = pvset.model.get("model_sha256")
        if expected and resolved.model_sha256 != expected and not allow_model_mismatch:
            raise InputError(f"{pvs_path} was made for weights {expected[:12]} but {ref} has "
                             f"{resolved.model_sha256[:12]}; pass --allow-model-mismatch to monitor a fine-tuned copy")
        loaded = load_model(resolved, device=str(pick_device(device)))
        if loaded.arch.hidden_size != pvset.hidden_size:
            raise InputError(f"{pvs_path} has {pvset.hidden_size}-dimensional PVs but {ref} has hidden size "
                             f"{loaded.arch.hidden_size}")
        missing = sorted({p.site for p in pvset.pvs} - set(loaded.arch.sites))
        if missing:
            raise InputError(f"{ref} does not offer the site(s) {', '.join(missing)} the .pvs file needs")
        return cls(pvset, loaded, **options)

    # -- checking -------------------------------------------------------------------------

    def _results(self, ratios: np.ndarray) -> list[MonitorResult]:
        best = ratios.argmax(axis=1)
        results = []
        for row, index in zip(ratios, best):
            pv = self.pvset.pvs[int(index)]
            results.append(MonitorResult(bool(row[index] > self.t_match), round(float(row[index]), 4), pv.id, pv.site))
        return results

    def check(self, texts: list[Text]) -> list[MonitorResult]:
        if self.reader is None:
            raise InputError("this monitor has no model loaded; use PVMonitor.load(...) or attach it to a model")
        texts = list(texts)
        if not texts:
            return []
        return self._results(match_ratios(self.reader.features(texts), self.keys, self.bits))

    # -- trigger removal --------------------------------------------------------------------

    def purge(self, text: Text) -> PurgeResult:
        first = self.check([text])[0]
        if not first.flagged:
            return PurgeResult(text, False, first.match, False, first.match, [], 1)
        segments, match, removed, passes = _segments(text), first.match, [], 1
        for _ in range(self.max_removals):
            tried = []
            for length in range(1, self.max_window + 1):
                candidates = _window_deletions(segments, length)
                if not candidates:
                    break
                results = self.check([_join(c[0], text) for c in candidates])
                passes += 1
                clean = [(r.match, i) for i, r in enumerate(results) if not r.flagged]
                if clean:
                    best_match, i = min(clean)
                    return PurgeResult(_join(candidates[i][0], text), True, first.match, False, best_match,
                                       removed + candidates[i][1], passes)
                tried.extend((r.match, c) for r, c in zip(results, candidates))
            if not tried:
                break
            best_match, best = min(tried, key=lambda item: item[0])
            if best_match >= match:
                break  # no deletion brings the input closer to clean
            segments, match, removed = best[0], best_match, removed + best[1]
        return PurgeResult(_join(segments, text), True, first.match, True, match, removed, passes)

    # -- attaching to a model -----------------------------------------------------------------

    def attach(self, model, on_flag=None):
        """Score every forward pass of ``model`` (a transformers model built on the scanned
        encoder, e.g. a fine-tuned classifier) from the features it computes anyway.

        Results land in ``self.last_results``; ``on_flag(results)`` is called when an
        input in the batch is flagged. Only PVs read from the plain input can be
        monitored this way (mask-site PVs need the prompt template). Returns the hook
        handle; ``handle.remove()`` detaches.
        """
        plain = [i for i, key in enumerate(self.keys) if key[1] is None]
        if not plain:
            raise InputError("no PV in this file is read from the plain input, so none can be monitored in place")
        keys, sites = [self.keys[i] for i in plain], sorted({self.keys[i][0] for i in plain})
        bits = [torch.as_tensor(np.asarray(self.bits[i])) for i in plain]
        entries = [self.pvset.pvs[i] for i in plain]
        base = getattr(model, "base_model", model)

        def hook(module, args, kwargs, output):
            attention = kwargs.get("attention_mask")
            if attention is None:
                attention = torch.ones(output.last_hidden_state.shape[:2], device=output.last_hidden_state.device)
            with torch.no_grad():
                feats = {(s, None): read_site(output, s, attention) for s in sites}
                ratios = match_ratios(feats, keys, [b.to(attention.device) for b in bits])
            best = ratios.argmax(axis=1)
            self.last_results = [MonitorResult(bool(row[i] > self.t_match), round(float(row[i]), 4), entries[i].id,
                                               entries[i].site) for row, i in zip(ratios, best)]
            if on_flag is not None and any(r.flagged for r in self.last_results):
                on_flag(self.last_results)

        return base.register_forward_hook(hook, with_kwargs=True)


def _segments(text: Text) -> list[str]:
    return [text] if isinstance(text, str) else list(text)


def _join(segments: list[str], like: Text) -> Text:
    return segments[0] if isinstance(like, str) else tuple(segments)


def _normal(word: str) -> str:
    return word.strip(string.punctuation).lower() or word


def _window_deletions(segments: list[str], length: int) -> list[tuple[list[str], list[str]]]:
    """Every way to delete ``length`` consecutive words from one segment, together with
    the other occurrences of the same words in every segment."""
    spans = [[m.span() for m in WORD.finditer(s)] for s in segments]
    candidates = []
    for index, segment in enumerate(segments):
        for start in range(len(spans[index]) - length + 1):
            window = [segment[a:b] for a, b in spans[index][start : start + length]]
            targets = {_normal(w) for w in window}
            new = [_delete(s, sp, {i for i, (a, b) in enumerate(sp) if _normal(s[a:b]) in targets})
                   for s, sp in zip(segments, spans)]
            candidates.append((new, window))
    return candidates


def _delete(text: str, spans: list[tuple[int, int]], drop: set[int]) -> str:
    """``text`` without the words at ``drop``, keeping the other words' spacing."""
    if not drop:
        return text
    kept = [i for i in range(len(spans)) if i not in drop]
    if not kept:
        return ""
    parts = [text[: spans[0][0]]]
    for n, i in enumerate(kept):
        start, end = spans[i]
        parts.append(text[start:end])
        if n < len(kept) - 1:
            following = spans[i + 1][0] if i + 1 < len(spans) else len(text)
            parts.append(text[end:following] or " ")
    parts.append(text[spans[-1][1] :])
    return "".join(parts)
