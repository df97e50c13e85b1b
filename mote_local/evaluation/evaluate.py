"""Evaluation: how far a steering profile moves a behaviour, against controls, and what it costs.

The paper's comparisons, on one set of prompts (each generated seeded, greedy by default, through the
model's chat template):

==============  ==========================================================================================
``unsteered``   no steering
``profile``     the profile's entries at its strength
``random``      random control profiles: as many experts per layer as the profile, the same modes, values
                and scopes, drawn from the same layers but never the profile's own experts (nor experts
                flagged as super-experts, when the guard's cache knows them); ``n_random`` seeds, pooled
                and per seed
``forced``      where the profile switches experts off (mask, drop, a -inf bias), the same experts forced on
==============  ==========================================================================================

Behaviour rate: the share of responses a detector calls the behaviour. Intervals follow the design (see
:mod:`mote_local.evaluation.intervals`): a condition's rate has a Wilson score 95% interval; the pooled random
control's responses cluster by prompt (one per seed), so its interval is Wilson's at the effective sample
size, prompts as clusters; the change against ``unsteered`` is paired by prompt (every condition answers the
same prompts), with Bonett & Price's adjusted Wald interval on the per-prompt differences.

Capability cost, on a neutral text (``mote_local/data/neutral.txt`` unless another is given): the mean over
positions of KL(unsteered ‖ steered) between next-token distributions, and the perplexity of the text, both
from the full logits of each chunk (``Session.logits``), log-softmax in float64.

Collapse: a condition whose mean KL exceeds ``COLLAPSE_KL`` nats (1.0: the super-expert guard's floor, "a
collapse, not a nudge"), or whose perplexity exceeds ``COLLAPSE_PERPLEXITY_RATIO`` (10) times the unsteered
one, is flagged ``collapsed``: its behaviour rate describes a broken model, not the behaviour (a model that
says "the the the" refuses nothing). The table, the plot and the report mark it, and the result warns.

Super-experts (:mod:`mote_local.evaluation.super_experts`): a warning when the profile switches off an expert
the guard's cache flags, and random controls keep off them.

Generation: every (condition, prompt) pair decodes in one batch with the others (:mod:`~mote_local.evaluation.run`,
the frame this module and the sweep share); with ``out_dir`` finished pairs are kept there and ``resume=True``
continues a run cut short.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from mote_local.engine.model import Model, opened
from mote_local.errors import EvalError
from mote_local.evaluation.controls import (
    check_control_entries,
    forced_counterpart,
    random_control,
)
from mote_local.evaluation.intervals import (
    clustered_rate_interval,
    paired_difference_interval,
    wilson_interval,
)
from mote_local.evaluation.run import (
    COLLAPSE_KL,
    COLLAPSE_PERPLEXITY_RATIO,
    Frame,
    Options,
    Planned,
)
from mote_local.steering.entries import Entry, off_experts
from mote_local.steering.profile import entry_to_json

__all__ = [
    "CONDITIONS",
    "COLLAPSE_KL",
    "COLLAPSE_PERPLEXITY_RATIO",
    "ConditionResult",
    "EvalResult",
    "RunResult",
    "evaluate",
]

#: Condition names, in report order.
CONDITIONS = ("unsteered", "profile", "random", "forced")

_LABELS = {
    "unsteered": "unsteered",
    "profile": "profile",
    "random": "random control (pooled)",
    "forced": "forced on",
}


def _pair(v: Any) -> tuple[float, float] | None:
    return None if v is None else (float(v[0]), float(v[1]))


@dataclass
class ConditionResult:
    """One condition's behaviour rate and capability cost. The pooled random control lists its seeds.

    ``delta`` is the mean over the prompts both conditions answered of (this condition's per-prompt rate −
    unsteered's); ``collapse`` says why a condition counts as collapsed (None: it does not, or the cost was
    not measured)."""

    name: str
    label: str
    entries: list[dict[str, Any]]
    strength: float
    n: int = 0
    hits: int = 0
    rate: float | None = None
    ci: tuple[float, float] | None = None
    delta: float | None = None
    delta_ci: tuple[float, float] | None = None
    kl: float | None = None
    perplexity: float | None = None
    seed: int | None = None
    collapse: str | None = None
    per_seed: list[ConditionResult] = field(default_factory=list)

    @property
    def collapsed(self) -> bool:
        return self.collapse is not None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_seed"}
        for k in ("ci", "delta_ci"):
            d[k] = None if d[k] is None else list(d[k])
        for k in ("kl", "perplexity"):  # JSON has no infinity
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = "inf"
        d["collapsed"] = self.collapsed
        d["entries"] = [dict(e) for e in self.entries]
        d["per_seed"] = [c.to_dict() for c in self.per_seed]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionResult:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["ci"], kw["delta_ci"] = _pair(d.get("ci")), _pair(d.get("delta_ci"))
        for k in ("kl", "perplexity"):
            if kw.get(k) == "inf":
                kw[k] = math.inf
        kw["entries"] = [dict(e) for e in d.get("entries", [])]
        kw["per_seed"] = [cls.from_dict(c) for c in d.get("per_seed", [])]
        return cls(**kw)


@dataclass(kw_only=True)
class RunResult:
    """What an evaluation or a sweep measured, with what both share: the model, the settings, every generation,
    the warnings, whether Ctrl-C cut it short and how long it took. ``to_dict()`` is plain JSON (no NaN);
    ``from_dict`` reads it back. A subclass adds its own fields (:meth:`_own`, :meth:`_own_from`)."""

    FORMAT: ClassVar[str] = ""
    WHAT: ClassVar[str] = ""
    model: str
    settings: dict[str, Any]
    generations: dict[str, list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)
    partial: bool = False
    elapsed_s: float = 0.0

    def _own(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _own_from(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": 1,
            "model": self.model,
            **self._own(),
            "settings": self.settings,
            "generations": self.generations,
            "warnings": list(self.warnings),
            "partial": self.partial,
            "elapsed_s": self.elapsed_s,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        if d.get("format") != cls.FORMAT:
            raise EvalError(f"not a {cls.WHAT} (format is not '{cls.FORMAT}')")
        return cls(
            model=d["model"],
            settings=dict(d["settings"]),
            generations=dict(d["generations"]),
            warnings=list(d.get("warnings", [])),
            partial=bool(d.get("partial", False)),
            elapsed_s=float(d.get("elapsed_s", 0.0)),
            **cls._own_from(d),
        )

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(kw_only=True)
class EvalResult(RunResult):
    """What :func:`evaluate` measured: one result per condition, the profile, sample responses."""

    FORMAT: ClassVar[str] = "mote-eval"
    WHAT: ClassVar[str] = "mote evaluation result"
    conditions: list[ConditionResult]
    profile: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def condition(self, name: str) -> ConditionResult:
        for c in self.conditions:
            if c.name == name:
                return c
            for s in c.per_seed:
                if s.name == name:
                    return s
        raise KeyError(f"no condition {name!r}; this result has {', '.join(c.name for c in self.conditions)}")

    @property
    def rates(self) -> dict[str, float | None]:
        return {c.name: c.rate for c in self.conditions}

    def _own(self) -> dict[str, Any]:
        return {"conditions": [c.to_dict() for c in self.conditions], "profile": self.profile, "samples": self.samples}

    @classmethod
    def _own_from(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "conditions": [ConditionResult.from_dict(c) for c in d["conditions"]],
            "profile": d["profile"],
            "samples": d["samples"],
        }


# --------------------------------------------------------------------------------------------------------
# Parts shared with the sweep (mote_local.evaluation.sweep)
# --------------------------------------------------------------------------------------------------------


def profile_parts(profile: Any, strength: float) -> tuple[list[Entry], float, str, str]:
    """(entries, strength, name, description) from a Profile or an iterable of entries."""
    if hasattr(profile, "entries") and hasattr(profile, "strength"):
        return (
            list(profile.entries),
            float(profile.strength) * float(strength),
            getattr(profile, "name", "") or "",
            getattr(profile, "description", "") or "",
        )
    entries = list(profile)
    for e in entries:
        if not isinstance(e, Entry):
            raise EvalError(f"expected steering entries, got {e!r}")
    return entries, float(strength), "", ""


def describe_profile(entries: Sequence[Entry], strength: float, name: str, description: str) -> dict[str, Any]:
    per_layer: dict[str, int] = defaultdict(int)
    modes: dict[str, int] = defaultdict(int)
    for e in entries:
        modes[e.mode.value] += 1
    for layer, _ in sorted({(e.layer, e.expert) for e in entries}):
        per_layer[str(layer)] += 1
    return {
        "name": name,
        "description": description,
        "strength": strength,
        "entries": [entry_to_json(e) for e in entries],
        "n_entries": len(entries),
        "n_experts": len({(e.layer, e.expert) for e in entries}),
        "experts_per_layer": dict(per_layer),
        "modes": dict(modes),
    }


def draw_random_controls(
    entries: Sequence[Entry],
    layout,
    seeds: Sequence[int],
    exclude: set[tuple[int, int]],
    strength: float,
    notes: list[str],
    what: str = "random",
) -> tuple[list[tuple[int, list[Entry]]], set[tuple[int, int]]]:
    """[(seed, control entries)] for each seed, and the experts actually excluded. When the super-experts leave
    too little room, draws from every other expert instead; when no control can be drawn, none (a note says
    why either way)."""
    try:
        return [(r, random_control(entries, layout, r, exclude=exclude, strength=strength)) for r in seeds], exclude
    except EvalError as err:
        if exclude:  # the super-experts left too little room: draw from every other expert instead
            try:
                controls = [(r, random_control(entries, layout, r, strength=strength)) for r in seeds]
                notes.append(f"{what}: super-experts not excluded ({err})")
                return controls, set()
            except EvalError as err2:
                err = err2
        notes.append(f"{what}: skipped, {err}")
        return [], exclude


def plan_forced(
    entries: Sequence[Entry], layout, strength: float, notes: list[str], what: str = "forced"
) -> list[Entry] | None:
    """The forced counterpart of the entries, or None (with a note) when there is none or the engine refuses it."""
    forced = forced_counterpart(entries, strength)
    if not forced:
        notes.append(f"{what}: skipped, the profile switches no expert off")
        return None
    try:
        check_control_entries(forced, layout, strength, "forced counterpart")
    except EvalError as err:
        notes.append(f"{what}: skipped, {err}")
        return None
    return forced


def _per_prompt(runs: Sequence[Sequence[Mapping[str, Any]]]) -> dict[int, tuple[int, int]]:
    """{prompt: (hits, responses)} over one or several runs (the seeds of a pooled control)."""
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for gens in runs:
        for g in gens:
            out[g["prompt"]][0] += bool(g["detected"])
            out[g["prompt"]][1] += 1
    return {p: (h, n) for p, (h, n) in out.items()}


def _collapse(c: ConditionResult, base: ConditionResult | None, kl_limit: float, ppl_ratio: float) -> str | None:
    """Why the condition's capability cost says the model collapsed, or None."""
    why = []
    if c.kl is not None and c.kl > kl_limit:
        why.append(f"KL {c.kl:.3g} nats > {kl_limit:g}")
    if c.perplexity is not None and base is not None and base.perplexity and c is not base:
        ratio = c.perplexity / base.perplexity
        if ratio > ppl_ratio:
            ppl = "inf" if not math.isfinite(c.perplexity) else f"{c.perplexity:.3g}"
            why.append(f"perplexity {ppl}, {ratio:.3g}x unsteered > {ppl_ratio:g}x")
    return "; ".join(why) or None


def summarise(
    plan: Sequence[Planned],
    generations: Mapping[str, Sequence[Mapping[str, Any]]],
    costs: Mapping[str, tuple[float | None, float | None]],
    strength: float,
    groups: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    *,
    base: str = "unsteered",
    kl_limit: float = COLLAPSE_KL,
    ppl_ratio: float = COLLAPSE_PERPLEXITY_RATIO,
) -> dict[str, ConditionResult]:
    """Each planned condition's statistics, with the members of each group (name -> (label, member names): the
    seeds of a random control) pooled into one result that lists them; deltas are paired with ``base``."""
    single: dict[str, ConditionResult] = {}
    for c in plan:
        gens = generations[c.name]
        n, hits = len(gens), sum(bool(g["detected"]) for g in gens)
        kl, ppl = costs.get(c.name, (None, None))
        single[c.name] = ConditionResult(
            name=c.name,
            label=c.label,
            entries=[entry_to_json(e) for e in c.entries],
            strength=strength,
            n=n,
            hits=hits,
            rate=hits / n if n else None,
            ci=wilson_interval(hits, n) if n else None,
            kl=kl,
            perplexity=ppl,
            seed=c.seed,
        )
    reference = single.get(base)
    base_prompts = _per_prompt([generations[base]]) if base in generations else {}

    def paired(result: ConditionResult, runs: Sequence[Sequence[Mapping[str, Any]]]) -> None:
        if result.name == base:
            result.delta, result.delta_ci = (0.0, (0.0, 0.0)) if result.n else (None, None)
            return
        mine = _per_prompt(runs)
        common = sorted(set(mine) & set(base_prompts))
        if not common:
            return
        result.delta, result.delta_ci = paired_difference_interval(
            [mine[p][0] / mine[p][1] for p in common], [base_prompts[p][0] / base_prompts[p][1] for p in common]
        )

    for name, result in single.items():
        paired(result, [generations[name]])
        result.collapse = _collapse(result, reference, kl_limit, ppl_ratio)
    out: dict[str, ConditionResult] = {}
    groups = groups or {}
    member_of = {m: g for g, (_, members) in groups.items() for m in members}
    for c in plan:
        group = member_of.get(c.name)
        if group is None:
            out[c.name] = single[c.name]
        elif group not in out:
            label, members = groups[group]
            seeds = [single[m] for m in members]
            pooled = ConditionResult(name=group, label=label, entries=[], strength=strength, per_seed=seeds)
            runs = [generations[m] for m in members]
            per_prompt = _per_prompt(runs)
            pooled.n, pooled.hits = sum(r.n for r in seeds), sum(r.hits for r in seeds)
            if pooled.n:
                prompts = sorted(per_prompt)
                pooled.rate, pooled.ci, _ = clustered_rate_interval(
                    [per_prompt[p][0] for p in prompts], [per_prompt[p][1] for p in prompts]
                )
            kls = [r.kl for r in seeds if r.kl is not None]
            perplexities = [r.perplexity for r in seeds if r.perplexity is not None]
            if len(kls) == len(seeds):
                pooled.kl = float(np.mean(kls))
            if len(perplexities) == len(seeds):
                pooled.perplexity = float(math.exp(np.mean([math.log(x) for x in perplexities])))
            paired(pooled, runs)
            broken = [r for r in seeds if r.collapsed]
            if broken:
                pooled.collapse = f"{len(broken)} of {len(seeds)} seeds collapsed"
            out[group] = pooled
    return out


def collapse_warnings(results: Sequence[ConditionResult]) -> list[str]:
    """One warning per collapsed condition (a pooled control's collapsed seeds are named under it)."""
    return [
        f"{c.label}: the model collapsed ({c.collapse}); its behaviour rate describes a broken model, not the behaviour"
        for c in results
        if c.collapsed
    ]


def evaluate(
    model: Model | str | os.PathLike,
    prompts: Sequence[Any],
    profile_entries: Any,
    strength: float = 1.0,
    *,
    n_samples: int = 5,
    **options: Any,
) -> EvalResult:
    """Behaviour rate and capability cost of a steering profile against its controls.

    ``profile_entries`` is a Profile (its strength is multiplied by ``strength``) or steering entries.
    ``prompts`` are strings or objects with ``.text`` (prompts.Prompt). ``options`` are
    :class:`~mote_local.evaluation.run.Options` (detector, n_random, seed, max_tokens, temperature, chat,
    neutral_text, measure_cost, n_parallel, out_dir, resume, …). With ``exclude_super_experts``, random
    controls avoid experts the super-expert cache flags. A condition whose KL exceeds ``collapse_kl`` or whose
    perplexity exceeds ``collapse_perplexity_ratio`` times the unsteered one is flagged as collapsed.

    Ctrl-C (KeyboardInterrupt) stops the run and returns what was measured so far, with ``partial=True``:
    conditions count only their finished generations; the capability cost is measured only when every
    generation finished.
    """
    opts = Options(**options)
    with opened(model) as m:
        entries, strength, name, description = profile_parts(profile_entries, strength)
        if not entries:
            raise EvalError("the profile has no entries: nothing to evaluate")
        frame = Frame(m, prompts, opts)
        check_control_entries(entries, frame.layout, strength, "the profile")
        warn = []
        hit = sorted(set(off_experts(entries, strength)) & frame.supers)
        if hit:
            warn.append(
                "the profile switches off super-expert(s) "
                + ", ".join(f"{l}:{x}" for l, x in hit)
                + ": a capability cost is likely (see the KL column)"
            )
        plan = [Planned("unsteered", _LABELS["unsteered"], []), Planned("profile", _LABELS["profile"], entries)]
        controls, frame.exclude = draw_random_controls(
            entries, frame.layout, [opts.seed + i for i in range(opts.n_random)], frame.exclude, strength, frame.notes
        )
        random_names = [f"random[seed={r}]" for r, _ in controls]
        plan += [Planned(f"random[seed={r}]", f"random control, seed {r}", ctl, r) for r, ctl in controls]
        forced = plan_forced(entries, frame.layout, strength, frame.notes)
        if forced is not None:
            plan.append(Planned("forced", _LABELS["forced"], forced))

        outcome = frame.run(plan, strength)
        results = summarise(
            plan,
            outcome.generations,
            outcome.costs,
            strength,
            {"random": (_LABELS["random"], random_names)} if random_names else {},
            kl_limit=opts.collapse_kl,
            ppl_ratio=opts.collapse_perplexity_ratio,
        )
        ordered = [results[c] for c in CONDITIONS if c in results]
        warn += collapse_warnings(ordered)

        sample_conds = [("unsteered", "unsteered"), ("profile", "profile")]
        if random_names:
            sample_conds.append((random_names[0], "random"))
        if "forced" in results:
            sample_conds.append(("forced", "forced"))
        by_prompt = {cname: {g["prompt"]: g for g in outcome.generations[cname]} for cname, _ in sample_conds}
        samples = []
        for i in range(min(n_samples, len(frame.texts))):
            responses, detected = {}, {}
            for cname, key in sample_conds:
                g = by_prompt[cname].get(i)
                if g is not None:
                    responses[key] = g["text"]
                    detected[key] = g["detected"]
            samples.append({"prompt": frame.texts[i], "responses": responses, "detected": detected})
        settings = frame.settings(outcome, random_seeds=[r for r, _ in controls])
        return EvalResult(
            model=str(m.path),
            conditions=ordered,
            profile=describe_profile(entries, strength, name, description),
            settings=settings,
            samples=samples,
            generations=outcome.generations,
            warnings=warn,
            partial=outcome.partial,
            elapsed_s=frame.elapsed,
        )
