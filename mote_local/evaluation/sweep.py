"""The paper's sweep: the behaviour rate with the top N experts of an fTRI ranking switched off, for each N.

At each N, against the same unsteered run, on the same prompts:

============  ===============================================================================================
``off``       the top N experts of the ranking switched off (drop, or mask)
``random``    random control profiles of the same size and layer distribution (``n_random`` seeds, pooled)
``forced``    the same N experts forced on (skipped at an N the engine cannot force: more than k in a layer)
============  ===============================================================================================

Rates, intervals, deltas, capability cost and the collapse flag are :mod:`~mote_local.evaluation.evaluate`'s.
The ranking comes from an fTRI result (``mote_local.ftri.outputs.read_ranking``): the experts of the chosen
method ordered by score, MoE layers only, flagged super-experts left out unless asked; each N says how many of its
experts carry evidence (a simultaneous band above 0), since a top N that outgrows the signal switches off noise.

    result = sweep(model, prompts, ranking, [1, 2, 5, 10, 20])
    write_sweep_report("sweep-out", result)   # mote_local.evaluation.report: sweep.json, .md, .png, .html

Every condition of every N, and the unsteered run they share, decode in one batch (:mod:`~mote_local.evaluation.run`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from mote_local.engine.model import Model, opened
from mote_local.errors import EvalError
from mote_local.evaluation.controls import check_control_entries
from mote_local.evaluation.evaluate import (
    ConditionResult,
    RunResult,
    collapse_warnings,
    draw_random_controls,
    plan_forced,
    summarise,
)
from mote_local.evaluation.run import Frame, Options, Planned
from mote_local.ftri.outputs import Ranking
from mote_local.steering.entries import Entry, Mode

__all__ = ["SweepPoint", "SweepResult", "parse_sweep", "sweep"]

OFF_MODES = (Mode.DROP, Mode.MASK)


def parse_sweep(text: str) -> list[int]:
    """ "1,2,5,10,20" -> [1, 2, 5, 10, 20] (sorted, unique); each N a whole number >= 1."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise EvalError(
                f"--sweep takes whole numbers separated by commas (e.g. 1,2,5,10,20), got {part!r}"
            ) from None
        if n < 1:
            raise EvalError(f"--sweep sizes must be >= 1, got {n}")
        out.add(n)
    if not out:
        raise EvalError(f"--sweep needs at least one size, got {text!r}")
    return sorted(out)


@dataclass
class SweepPoint:
    """One N: the top N switched off, the pooled random control of that shape, and forced activation."""

    n: int
    experts: list[tuple[int, int]]
    n_evidence: int
    off: ConditionResult | None = None
    random: ConditionResult | None = None
    forced: ConditionResult | None = None

    def conditions(self) -> list[ConditionResult]:
        return [c for c in (self.off, self.random, self.forced) if c is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "experts": [list(x) for x in self.experts],
            "n_evidence": self.n_evidence,
            **{
                k: None if c is None else c.to_dict()
                for k, c in (("off", self.off), ("random", self.random), ("forced", self.forced))
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepPoint:
        return cls(
            n=int(d["n"]),
            experts=[(int(a), int(b)) for a, b in d["experts"]],
            n_evidence=int(d["n_evidence"]),
            **{k: None if d.get(k) is None else ConditionResult.from_dict(d[k]) for k in ("off", "random", "forced")},
        )


@dataclass(kw_only=True)
class SweepResult(RunResult):
    """What :func:`sweep` measured: the unsteered run and one point per N."""

    FORMAT: ClassVar[str] = "mote-sweep"
    WHAT: ClassVar[str] = "mote sweep result"
    unsteered: ConditionResult
    points: list[SweepPoint]
    ranking: dict[str, Any]

    def point(self, n: int) -> SweepPoint:
        for p in self.points:
            if p.n == n:
                return p
        raise KeyError(f"no sweep point N={n}; this sweep has {', '.join(str(p.n) for p in self.points)}")

    def _own(self) -> dict[str, Any]:
        return {
            "unsteered": self.unsteered.to_dict(),
            "points": [p.to_dict() for p in self.points],
            "ranking": self.ranking,
        }

    @classmethod
    def _own_from(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "unsteered": ConditionResult.from_dict(d["unsteered"]),
            "points": [SweepPoint.from_dict(p) for p in d["points"]],
            "ranking": dict(d["ranking"]),
        }


def sweep(
    model: Model | str | os.PathLike,
    prompts: Sequence[Any],
    ranking: Ranking | Sequence[tuple[int, int]],
    sizes: Sequence[int],
    *,
    mode: Mode | str = Mode.DROP,
    **options: Any,
) -> SweepResult:
    """Behaviour rate and capability cost with the top N experts of ``ranking`` switched off (``mode``: drop
    or mask), a random control of the same shape, and the same experts forced on, for each N in ``sizes``.
    ``options`` are :class:`~mote_local.evaluation.run.Options`, as for evaluate(). An N larger than the
    ranking, or one the engine cannot switch off, is skipped with a note. Ctrl-C keeps what was finished
    (``partial``)."""
    opts = Options(**options)
    if not isinstance(ranking, Ranking):
        ranking = Ranking([(int(l), int(e)) for l, e in ranking])
    mode = Mode(mode)
    if mode not in OFF_MODES:
        raise EvalError(f"the sweep switches experts off: mode drop or mask, not {mode.value}")
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < 1:
        raise EvalError("the sweep needs sizes N >= 1")
    if not ranking.experts:
        raise EvalError("the ranking has no experts to switch off")
    with opened(model) as m:
        frame = Frame(m, prompts, opts)
        layout, notes, strength = frame.layout, frame.notes, 1.0
        if ranking.left_out:
            notes.append("super-experts left out of the ranking: " + ", ".join(f"{l}:{e}" for l, e in ranking.left_out))
        plan = [Planned("unsteered", "unsteered", [])]
        groups: dict[str, tuple[str, list[str]]] = {}
        points: list[SweepPoint] = []
        for n in sizes:
            if n > len(ranking.experts):
                notes.append(f"N={n}: skipped, the ranking has only {len(ranking.experts)} experts")
                continue
            top = ranking.experts[:n]
            off = [Entry(l, e, mode) for l, e in top]
            try:
                check_control_entries(off, layout, strength, f"the top {n}")
            except EvalError as err:
                notes.append(f"N={n}: skipped, {err}")
                continue
            points.append(SweepPoint(n, top, sum(x in ranking.evidence for x in top)))
            plan.append(Planned(f"off[{n}]", f"top {n} off", off))
            controls, _ = draw_random_controls(
                off,
                layout,
                [opts.seed + i for i in range(opts.n_random)],
                frame.exclude,
                strength,
                notes,
                what=f"random N={n}",
            )
            names = [f"random[{n}][seed={r}]" for r, _ in controls]
            plan += [
                Planned(name, f"random control N={n}, seed {r}", ctl, r) for name, (r, ctl) in zip(names, controls)
            ]
            if names:
                groups[f"random[{n}]"] = (f"random control N={n}", names)
            forced = plan_forced(off, layout, strength, notes, what=f"forced N={n}")
            if forced is not None:
                plan.append(Planned(f"forced[{n}]", f"top {n} forced on", forced))
        if not points:
            raise EvalError("no sweep size could be run: " + "; ".join(notes))

        outcome = frame.run(plan, strength, desc="sweep")
        results = summarise(
            plan,
            outcome.generations,
            outcome.costs,
            strength,
            groups,
            kl_limit=opts.collapse_kl,
            ppl_ratio=opts.collapse_perplexity_ratio,
        )
        for p in points:
            p.off, p.random, p.forced = (results.get(f"{k}[{p.n}]") for k in ("off", "random", "forced"))
        warnings = []
        hit = sorted(set(ranking.experts[: points[-1].n]) & frame.supers)
        if hit:
            warnings.append("the sweep switches off super-expert(s) " + ", ".join(f"{l}:{e}" for l, e in hit))
        for p in points:
            warnings += [f"N={p.n}, {w}" for w in collapse_warnings(p.conditions())]
            if p.n_evidence < p.n:
                notes.append(f"N={p.n}: {p.n_evidence} of the {p.n} experts carry evidence (a band above 0)")
        settings = frame.settings(outcome, sizes=sizes, mode=mode.value)
        return SweepResult(
            model=str(m.path),
            unsteered=results["unsteered"],
            points=points,
            ranking={
                "source": ranking.source,
                "method": ranking.method,
                "experts": [list(x) for x in ranking.experts[: max(sizes)]],
                "evidence": [list(x) for x in sorted(ranking.evidence)],
                "left_out": [list(x) for x in ranking.left_out],
            },
            settings=settings,
            generations=outcome.generations,
            warnings=warnings,
            partial=outcome.partial,
            elapsed_s=frame.elapsed,
        )
