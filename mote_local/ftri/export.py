"""The steering profile an fTRI result supports: which experts qualify, in which mode, and why others were left
out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from mote_local.engine.model import Model
from mote_local.errors import MoteError
from mote_local.ftri.stats import MIN_BOOT_EVIDENCE, FtriResult, RankedExpert
from mote_local.steering.entries import Entry, Mode
from mote_local.steering.profile import Profile, ProfileError


def profile_from_ranking(
    ranked: Sequence[RankedExpert],
    model: Model,
    *,
    positive: str = "drop",
    negative: str = "force",
    name: str = "ftri",
    metadata: dict | None = None,
):
    """Experts that fire more on the behaviour are switched off (positive mode), those that fire
    less are forced on (negative mode); an expert that scores 0 carries no evidence and is left out.
    :func:`export_profile` also asks for evidence (an interval that excludes 0) and keeps off super-experts."""
    entries = [Entry(r.layer, r.expert, Mode(positive if r.score > 0 else negative)) for r in ranked if r.score != 0]
    return Profile.from_entries(entries, model_path=model.path, name=name, metadata=metadata or {})


@dataclass
class Export:
    """The profile an fTRI result exports, and why it holds what it holds."""

    profile: Profile
    chosen: list[RankedExpert]  # exported, in rank order
    n_qualified: int  # experts with evidence for the sign, before any cap
    top: int  # the cap asked for
    skipped: list[tuple[RankedExpert, str]]  # qualified but left out, and why
    settings: dict

    def summary(self) -> str:
        """What a person reads after `mote ftri`: how many qualified, what was exported, what was left out."""
        s = self.settings
        what = {
            "positive": "more active on the behaviour",
            "negative": "less active on the behaviour",
            "abs": "active differently on the behaviour",
        }[s["sign"]]
        bound = "0" if not s["threshold"] else f"±{s['threshold']:g}"
        interval = "simultaneous 95% band" if s["evidence"] == "simultaneous" else "per-expert 95% interval"
        lines = [
            f"profile: {self.n_qualified} expert(s) {what} with evidence ({interval} beyond {bound}); "
            f"exported {len(self.chosen)} (--top {self.top})"
        ]
        if self.chosen:
            lines.append("  " + ", ".join(map(str, self.profile.entries)))
        elif s["n_boot"] < MIN_BOOT_EVIDENCE:
            lines.append(
                f"  no expert qualified: {s['n_boot']} bootstrap replicates are too few for evidence "
                f"(--n-boot {MIN_BOOT_EVIDENCE} or more; 200 by default)"
            )
        else:
            lines.append(
                "  no expert qualified: the profile has no entries (more prompts narrow the intervals; "
                "--evidence per-expert or a lower --threshold loosens the bar)"
            )
        lines += [f"  left out {r.layer}:{r.expert}: {why}" for r, why in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            **self.settings,
            "top": self.top,
            "n_qualified": self.n_qualified,
            "exported": [[r.layer, r.expert] for r in self.chosen],
            "skipped": [{"layer": r.layer, "expert": r.expert, "why": why} for r, why in self.skipped],
        }


def export_profile(
    result: FtriResult,
    model: Model,
    *,
    top: int = 10,
    sign: str = "positive",
    threshold: float = 0.0,
    evidence: str = "simultaneous",
    per_layer_cap: int | None = None,
    off_mode: str = "drop",
    force_positive: bool = False,
    graded: float | None = None,
    log_ratio: np.ndarray | None = None,
    super_experts: Iterable[tuple[int, int]] = (),
    include_super_experts: bool = False,
    name: str = "ftri",
    metadata: dict | None = None,
) -> Export:
    """The steering profile an fTRI result supports, at most ``top`` experts.

    Only experts with evidence qualify (:meth:`FtriResult.qualified`: a score of the sign whose interval lies
    beyond ``threshold``); they are taken in rank order. An expert more active on the behaviour is switched off
    (``off_mode``), or forced on with ``force_positive``; one less active on it (sign negative or abs) is forced
    on. With ``graded`` (alpha), every chosen expert gets a router bias b = -alpha x its log odds ratio
    (``log_ratio``, the log_odds method's scores) instead: a profile's strength scales it. ``super_experts``
    (those the guard flagged) are left out unless ``include_super_experts``; so is any entry the engine would
    refuse beside those already chosen (more forced experts than k in a layer, say). Each left-out expert is
    listed with the reason.
    """
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise MoteError(f"--top must be a whole number >= 1, got {top!r}")
    if per_layer_cap is not None and per_layer_cap < 1:
        raise MoteError(f"--per-layer-cap must be >= 1, got {per_layer_cap}")
    if graded is not None:
        if not (np.isfinite(graded) and graded > 0):
            raise MoteError(f"--graded takes alpha > 0 (the bias is -alpha x log odds ratio), got {graded!r}")
        if log_ratio is None or np.shape(log_ratio) != result.scores.shape:
            raise MoteError("a graded export needs the log_odds scores of the same experts")
    layout = model.layout
    try:
        candidates, n_qualified = result.evidence(
            sign=sign, threshold=threshold, layers=layout.moe_layers, evidence=evidence
        )
    except ValueError as err:
        raise MoteError(str(err)) from None
    flagged = set() if include_super_experts else {(int(l), int(e)) for l, e in super_experts}
    entries: list[Entry] = []
    chosen: list[RankedExpert] = []
    skipped: list[tuple[RankedExpert, str]] = []
    per_layer: dict[int, int] = {}
    for r in candidates:
        if len(chosen) >= top:
            break
        if (r.layer, r.expert) in flagged:
            skipped.append(
                (r, "a flagged super-expert (mote inspect --super-experts); --include-super-experts steers it anyway")
            )
            continue
        if per_layer_cap is not None and per_layer.get(r.layer, 0) >= per_layer_cap:
            skipped.append((r, f"layer {r.layer} already has --per-layer-cap {per_layer_cap} experts"))
            continue
        if graded is not None and log_ratio is not None:  # both checked above
            value = -float(graded) * float(log_ratio[r.layer, r.expert])
            if value == 0:
                skipped.append((r, "its log odds ratio is 0: no bias to set"))
                continue
            entry = Entry(r.layer, r.expert, Mode.BIAS, value)
        elif r.score > 0 and not force_positive:
            entry = Entry(r.layer, r.expert, Mode(off_mode))
        else:
            entry = Entry(r.layer, r.expert, Mode.FORCE)
        try:
            Profile((*entries, entry)).validate(layout)
        except ProfileError as err:
            skipped.append((r, f"the engine would refuse it: {err}"))
            continue
        entries.append(entry)
        chosen.append(r)
        per_layer[r.layer] = per_layer.get(r.layer, 0) + 1
    settings = {
        "method": result.method,
        "n_boot": result.n_boot,
        "sign": sign,
        "threshold": float(threshold),
        "evidence": evidence,
        "off_mode": off_mode,
        "force_positive": bool(force_positive),
        "graded_alpha": graded,
        "per_layer_cap": per_layer_cap,
        "include_super_experts": bool(include_super_experts),
    }
    export = Export(Profile(), chosen, n_qualified, int(top), skipped, settings)
    return replace(
        export,
        profile=Profile.from_entries(
            entries, model_path=model.path, name=name, metadata={**(metadata or {}), "export": export.to_dict()}
        ),
    )
