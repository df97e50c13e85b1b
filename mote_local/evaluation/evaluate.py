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

Behaviour rate: the share of responses a detector calls the behaviour, with a Wilson score 95% interval. The
change against ``unsteered`` comes with Newcombe's hybrid score interval for a difference of proportions
(Newcombe 1998, method 10), computed from the two Wilson intervals. That method treats the two conditions
as independent samples; here they share prompts, so the interval is conservative (wider than a paired one).
The pooled random control likewise treats every seed's generations as independent.

Capability cost, on a neutral text (``mote_local/data/neutral.txt`` unless another is given): the mean over
positions of KL(unsteered ‖ steered) between next-token distributions, and the perplexity of the text, both
from the full logits of each chunk (``Session.logits``), log-softmax in float64.

Super-expert guard: :func:`find_super_experts` switches every expert off alone and measures the KL it causes
on the neutral text; experts far above the median are flagged (the few experts a model cannot lose). Results
are cached per model file; :func:`cached_super_experts` reads the cache without recomputing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np

from mote_local.engine.model import Model
from mote_local.errors import EvalError
from mote_local.evaluation.controls import (
    check_control_entries,
    forced_counterpart,
    off_experts,
    random_control,
)
from mote_local.evaluation.cost import (
    capability_cost,
    n_ctx_train,
    resolve_text,
    text_chunks,
)
from mote_local.evaluation.detectors import (
    Detector,
    describe_detector,
    detect,
)
from mote_local.evaluation.intervals import newcombe_interval, wilson_interval
from mote_local.evaluation.super_experts import (
    cached_super_experts,
)
from mote_local.progress import progress_bar
from mote_local.steering.entries import Entry
from mote_local.steering.profile import entry_to_json

__all__ = ["CONDITIONS", "ConditionResult", "EvalResult", "evaluate"]

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
    """One condition's behaviour rate and capability cost. The pooled random control lists its seeds."""

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
    per_seed: list["ConditionResult"] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_seed"}
        for k in ("ci", "delta_ci"):
            d[k] = None if d[k] is None else list(d[k])
        for k in ("kl", "perplexity"):  # JSON has no infinity
            if d[k] is not None and not math.isfinite(d[k]):
                d[k] = "inf"
        d["entries"] = [dict(e) for e in self.entries]
        d["per_seed"] = [c.to_dict() for c in self.per_seed]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ConditionResult":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["ci"], kw["delta_ci"] = _pair(d.get("ci")), _pair(d.get("delta_ci"))
        for k in ("kl", "perplexity"):
            if kw.get(k) == "inf":
                kw[k] = math.inf
        kw["entries"] = [dict(e) for e in d.get("entries", [])]
        kw["per_seed"] = [cls.from_dict(c) for c in d.get("per_seed", [])]
        return cls(**kw)


@dataclass
class EvalResult:
    """What :func:`evaluate` measured. ``to_dict()`` is plain JSON (no NaN); ``from_dict`` reads it back."""

    model: str
    conditions: list[ConditionResult]
    profile: dict[str, Any]
    settings: dict[str, Any]
    samples: list[dict[str, Any]]
    generations: dict[str, list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)
    partial: bool = False
    elapsed_s: float = 0.0

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

    def to_dict(self) -> dict[str, Any]:
        return {"format": "mote-eval", "version": 1, "model": self.model,
                "conditions": [c.to_dict() for c in self.conditions], "profile": self.profile,
                "settings": self.settings, "samples": self.samples, "generations": self.generations,
                "warnings": list(self.warnings), "partial": self.partial, "elapsed_s": self.elapsed_s}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalResult":
        if d.get("format") != "mote-eval":
            raise EvalError("not a mote evaluation result (format is not 'mote-eval')")
        return cls(model=d["model"], conditions=[ConditionResult.from_dict(c) for c in d["conditions"]],
                   profile=d["profile"], settings=d["settings"], samples=d["samples"],
                   generations=d["generations"], warnings=list(d.get("warnings", [])),
                   partial=bool(d.get("partial", False)), elapsed_s=float(d.get("elapsed_s", 0.0)))

    @classmethod
    def from_json(cls, text: str) -> "EvalResult":
        return cls.from_dict(json.loads(text))


def _profile_parts(profile: Any, strength: float) -> tuple[list[Entry], float, str, str]:
    """(entries, strength, name, description) from a Profile or an iterable of entries."""
    if hasattr(profile, "entries") and hasattr(profile, "strength"):
        return (list(profile.entries), float(profile.strength) * float(strength),
                getattr(profile, "name", "") or "", getattr(profile, "description", "") or "")
    entries = list(profile)
    for e in entries:
        if not isinstance(e, Entry):
            raise EvalError(f"expected steering entries, got {e!r}")
    return entries, float(strength), "", ""


def _describe_profile(entries: Sequence[Entry], strength: float, name: str, description: str) -> dict[str, Any]:
    per_layer: dict[str, int] = defaultdict(int)
    modes: dict[str, int] = defaultdict(int)
    for e in entries:
        modes[e.mode.value] += 1
    for layer, _ in sorted({(e.layer, e.expert) for e in entries}):
        per_layer[str(layer)] += 1
    return {"name": name, "description": description, "strength": strength,
            "entries": [entry_to_json(e) for e in entries], "n_entries": len(entries),
            "n_experts": len({(e.layer, e.expert) for e in entries}), "experts_per_layer": dict(per_layer),
            "modes": dict(modes)}


def _prompt_text(prompt: Any) -> str:
    text = prompt.text if hasattr(prompt, "text") else prompt
    if not isinstance(text, str):
        raise EvalError(f"a prompt must be a string or have .text, got {prompt!r}")
    return text


def evaluate(model: Model | str | os.PathLike, prompts: Sequence[Any], profile_entries: Any,
             strength: float = 1.0, *, neutral_text: str | os.PathLike | None = None, detector: Any = None,
             n_random: int = 3, seed: int = 0, max_tokens: int = 32, chat: bool = True,
             temperature: float = 0.0, n_samples: int = 5, measure_cost: bool = True,
             chunk_tokens: int = 256, max_neutral_tokens: int = 1024, exclude_super_experts: bool = True,
             show_progress: bool | None = None) -> EvalResult:
    """Behaviour rate and capability cost of a steering profile against its controls.

    ``profile_entries`` is a Profile (its strength is multiplied by ``strength``) or steering entries.
    ``prompts`` are strings or objects with ``.text`` (prompts.Prompt). ``detector`` is a :class:`Detector`
    (default phrases when None), a :class:`JudgeDetector`, or any callable ``response -> bool``.
    ``neutral_text`` is the text itself (str), a file (a PathLike), or None for the packaged default.
    With ``exclude_super_experts``, random controls avoid experts the super-expert cache flags.

    Ctrl-C (KeyboardInterrupt) stops the run and returns what was measured so far, with ``partial=True``:
    conditions cut short count only their finished generations; the capability cost is measured only when
    every generation finished.
    """
    if not isinstance(model, Model):
        with Model(model) as m:
            return evaluate(m, prompts, profile_entries, strength, neutral_text=neutral_text, detector=detector,
                            n_random=n_random, seed=seed, max_tokens=max_tokens, chat=chat,
                            temperature=temperature, n_samples=n_samples, measure_cost=measure_cost,
                            chunk_tokens=chunk_tokens, max_neutral_tokens=max_neutral_tokens,
                            exclude_super_experts=exclude_super_experts, show_progress=show_progress)
    started = time.perf_counter()
    layout = model.layout.require_moe()
    entries, strength, name, description = _profile_parts(profile_entries, strength)
    if not entries:
        raise EvalError("the profile has no entries: nothing to evaluate")
    texts = [_prompt_text(p) for p in prompts]
    if not texts:
        raise EvalError("no prompts to evaluate")
    if n_random < 0 or max_tokens < 1 or chunk_tokens < 2:
        raise EvalError("n_random must be >= 0, max_tokens >= 1 and chunk_tokens >= 2")
    detector = Detector() if detector is None else detector
    check_control_entries(entries, layout, strength, "the profile")

    notes: list[str] = []
    warn: list[str] = []
    supers = cached_super_experts(model.path)
    if supers:
        hit = sorted(set(off_experts(entries, strength)) & supers)
        if hit:
            warn.append("the profile switches off super-expert(s) "
                        + ", ".join(f"{l}:{x}" for l, x in hit)
                        + ": a capability cost is likely (see the KL column)")
    exclude = supers if (exclude_super_experts and supers) else set()

    # conditions: name -> (entries, seed)
    plan: list[tuple[str, list[Entry], int | None]] = [("unsteered", [], None), ("profile", entries, None)]
    random_seeds = [seed + i for i in range(n_random)]
    controls = []
    try:
        controls = [random_control(entries, layout, r, exclude=exclude, strength=strength) for r in random_seeds]
    except EvalError as err:
        if exclude:  # the super-experts left too little room: draw from every other expert instead
            try:
                controls = [random_control(entries, layout, r, strength=strength) for r in random_seeds]
                notes.append(f"random: super-experts not excluded ({err})")
                exclude = set()
            except EvalError as err2:
                err = err2
        if not controls:
            notes.append(f"random: skipped, {err}")
            random_seeds = []
    for r, ctl in zip(random_seeds, controls):
        plan.append((f"random[seed={r}]", ctl, r))
    forced = forced_counterpart(entries, strength)
    if not forced:
        notes.append("forced: skipped, the profile switches no expert off")
    else:
        try:
            check_control_entries(forced, layout, strength, "forced counterpart")
            plan.append(("forced", forced, None))
        except EvalError as err:
            notes.append(f"forced: skipped, {err}")

    prompt_tokens = [model.prompt_tokens(t, chat=chat) for t in texts]
    neutral_source = None
    chunks: list[list[int]] = []
    if measure_cost:
        body, neutral_source = resolve_text(neutral_text)
        n_train = n_ctx_train(model)
        chunk = min(chunk_tokens, n_train) if n_train >= 2 else chunk_tokens
        chunks = text_chunks(model, body, chunk, max_neutral_tokens)
    longest = max(max(len(t) for t in prompt_tokens) + max_tokens, max((len(c) for c in chunks), default=0)) + 8
    generations: dict[str, list[dict[str, Any]]] = {c: [] for c, _, _ in plan}
    partial = False
    costs: dict[str, tuple[float | None, float | None]] = {}

    with model.session(n_ctx=longest, n_batch=min(longest, 2048)) as s:
        for cname, cent, _ in plan:  # fail on a refused steering before any generation
            if cent:
                s.steer(cent, strength)
        s.clear_steering()
        try:
            with progress_bar(len(plan) * len(texts), "evaluating", "generation", show_progress) as bar:
                for cname, cent, _ in plan:
                    if cent:
                        s.steer(cent, strength)
                    else:
                        s.clear_steering()
                    for i, (text, toks) in enumerate(zip(texts, prompt_tokens)):
                        gen = s.generate(toks, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                         add_bos=False)
                        if gen.interrupted:  # generate() swallows Ctrl-C: honour it here
                            raise KeyboardInterrupt
                        hit = detect(detector, gen.text, text)
                        generations[cname].append({"prompt": i, "text": gen.text, "detected": bool(hit),
                                                   "n_tokens": len(gen.tokens)})
                        bar.update(1)
            if chunks:
                costs = capability_cost(s, chunks, {c: (e, strength) for c, e, _ in plan})
        except KeyboardInterrupt:
            partial = True
        s.clear_steering()

    # per-condition statistics
    def stats(cname: str, label: str, cent: list[Entry], cseed: int | None, gens: list[dict]) -> ConditionResult:
        n, hits = len(gens), sum(g["detected"] for g in gens)
        kl, ppl = costs.get(cname, (None, None))
        return ConditionResult(name=cname, label=label, entries=[entry_to_json(e) for e in cent], strength=strength,
                               n=n, hits=hits, rate=hits / n if n else None,
                               ci=wilson_interval(hits, n) if n else None, kl=kl, perplexity=ppl, seed=cseed)

    results: dict[str, ConditionResult] = {}
    seeds_res = []
    for cname, cent, cseed in plan:
        label = f"random control, seed {cseed}" if cseed is not None else _LABELS[cname]
        r = stats(cname, label, cent, cseed, generations[cname])
        if cseed is not None:
            seeds_res.append(r)
        else:
            results[cname] = r
    if seeds_res:
        pooled = ConditionResult(name="random", label=_LABELS["random"], entries=[], strength=strength,
                                 per_seed=seeds_res)
        pooled.n = sum(r.n for r in seeds_res)
        pooled.hits = sum(r.hits for r in seeds_res)
        if pooled.n:
            pooled.rate = pooled.hits / pooled.n
            pooled.ci = wilson_interval(pooled.hits, pooled.n)
        have = [r for r in seeds_res if r.kl is not None]
        if have and len(have) == len(seeds_res):
            pooled.kl = float(np.mean([r.kl for r in have]))
            pooled.perplexity = float(math.exp(np.mean([math.log(r.perplexity) for r in have])))
        results["random"] = pooled
    base = results["unsteered"]
    ordered = [results[c] for c in CONDITIONS if c in results]
    for r in ordered:
        for x in [r, *r.per_seed]:
            if x.n and base.n:
                x.delta = x.rate - base.rate
                x.delta_ci = (0.0, 0.0) if x is base else newcombe_interval(x.hits, x.n, base.hits, base.n)

    shown = list(range(min(n_samples, len(texts))))
    sample_conds = [("unsteered", "unsteered"), ("profile", "profile")]
    if seeds_res:
        sample_conds.append((seeds_res[0].name, "random"))
    if "forced" in results:
        sample_conds.append(("forced", "forced"))
    samples = []
    for i in shown:
        row = {"prompt": texts[i], "responses": {}, "detected": {}}
        for cname, key in sample_conds:
            gens = generations[cname]
            if i < len(gens):
                row["responses"][key] = gens[i]["text"]
                row["detected"][key] = gens[i]["detected"]
        samples.append(row)

    if partial:
        notes.append("interrupted: partial results (only finished generations are counted)")
    settings = {
        "n_prompts": len(texts), "prompts": texts, "n_random": n_random, "random_seeds": random_seeds,
        "seed": seed, "max_tokens": max_tokens, "temperature": temperature,
        "decoding": "greedy" if temperature <= 0 else f"sampled (temperature {temperature})",
        "chat": chat, "chat_template": bool(chat and model.chat_template),
        "detector": describe_detector(detector),
        "neutral_text": neutral_source, "neutral_tokens": sum(len(c) for c in chunks), "chunks": len(chunks),
        "chunk_tokens": max((len(c) for c in chunks), default=0),
        "rate_interval": "Wilson score, 95%",
        "delta_interval": "Newcombe hybrid score (method 10), 95%, independent-samples (conservative for "
                          "shared prompts)",
        "kl": "mean over positions of KL(unsteered || steered), nats, next-token distributions on the neutral "
              "text",
        "random_excluded_super_experts": [list(x) for x in sorted(exclude)],
        "notes": notes,
    }
    return EvalResult(model=str(model.path), conditions=ordered,
                      profile=_describe_profile(entries, strength, name, description), settings=settings,
                      samples=samples, generations=generations, warnings=warn, partial=partial,
                      elapsed_s=time.perf_counter() - started)
