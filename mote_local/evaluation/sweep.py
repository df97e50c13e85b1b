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
    write_sweep_report("sweep-out", result)   # sweep.json, sweep.md, sweep.png, sweep.html
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mote_local.atomic import atomic_write_bytes, atomic_write_text
from mote_local.engine.model import Model
from mote_local.errors import EvalError
from mote_local.evaluation.controls import check_control_entries
from mote_local.evaluation.detectors import Detector, describe_detector
from mote_local.evaluation.evaluate import (
    COLLAPSE_KL,
    COLLAPSE_PERPLEXITY_RATIO,
    DELTA_INTERVAL,
    RATE_INTERVAL,
    ConditionResult,
    Planned,
    check_settings,
    collapse_warnings,
    draw_random_controls,
    neutral_chunks,
    plan_forced,
    prepare_prompts,
    run_conditions,
    summarise,
)
from mote_local.evaluation.report import (
    COLLAPSE_COLOUR,
    COLOURS,
    b64,
    delta_text,
    detector_text,
    footer,
    md_cell,
    md_table,
    new_figure,
    num,
    pct,
    png_bytes,
    ppl_text,
    rate_text,
    render,
    text_table,
)
from mote_local.evaluation.super_experts import cached_super_experts
from mote_local.ftri.outputs import Ranking
from mote_local.steering.entries import Entry, Mode

__all__ = ["SweepPoint", "SweepResult", "parse_sweep", "sweep", "sweep_table", "write_sweep_report"]

SWEEP_FORMAT = "mote-sweep"
PLOT_NAME = "sweep.png"
OFF_MODES = (Mode.DROP, Mode.MASK)


def parse_sweep(text: str) -> list[int]:
    """"1,2,5,10,20" -> [1, 2, 5, 10, 20] (sorted, unique); each N a whole number >= 1."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            raise EvalError(f"--sweep takes whole numbers separated by commas (e.g. 1,2,5,10,20), got {part!r}") from None
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
        return {"n": self.n, "experts": [list(x) for x in self.experts], "n_evidence": self.n_evidence,
                **{k: None if c is None else c.to_dict() for k, c in
                   (("off", self.off), ("random", self.random), ("forced", self.forced))}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepPoint":
        return cls(n=int(d["n"]), experts=[(int(a), int(b)) for a, b in d["experts"]], n_evidence=int(d["n_evidence"]),
                   **{k: None if d.get(k) is None else ConditionResult.from_dict(d[k])
                      for k in ("off", "random", "forced")})


@dataclass
class SweepResult:
    model: str
    unsteered: ConditionResult
    points: list[SweepPoint]
    ranking: dict[str, Any]
    settings: dict[str, Any]
    generations: dict[str, list[dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)
    partial: bool = False
    elapsed_s: float = 0.0

    def point(self, n: int) -> SweepPoint:
        for p in self.points:
            if p.n == n:
                return p
        raise KeyError(f"no sweep point N={n}; this sweep has {', '.join(str(p.n) for p in self.points)}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": SWEEP_FORMAT, "version": 1, "model": self.model, "unsteered": self.unsteered.to_dict(),
                "points": [p.to_dict() for p in self.points], "ranking": self.ranking, "settings": self.settings,
                "generations": self.generations, "warnings": list(self.warnings), "partial": self.partial,
                "elapsed_s": self.elapsed_s}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SweepResult":
        if d.get("format") != SWEEP_FORMAT:
            raise EvalError("not a mote sweep result (format is not 'mote-sweep')")
        return cls(model=d["model"], unsteered=ConditionResult.from_dict(d["unsteered"]),
                   points=[SweepPoint.from_dict(p) for p in d["points"]], ranking=dict(d["ranking"]),
                   settings=dict(d["settings"]), generations=dict(d["generations"]),
                   warnings=list(d.get("warnings", [])), partial=bool(d.get("partial", False)),
                   elapsed_s=float(d.get("elapsed_s", 0.0)))

    @classmethod
    def from_json(cls, text: str) -> "SweepResult":
        return cls.from_dict(json.loads(text))


def sweep(model: Model | str | os.PathLike, prompts: Sequence[Any], ranking: Ranking | Sequence[tuple[int, int]],
          sizes: Sequence[int], *, mode: Mode | str = Mode.DROP, neutral_text: str | os.PathLike | None = None,
          detector: Any = None, n_random: int = 3, seed: int = 0, max_tokens: int = 32, chat: bool = True,
          temperature: float = 0.0, measure_cost: bool = True, chunk_tokens: int = 256,
          max_neutral_tokens: int = 1024, exclude_super_experts: bool = True, collapse_kl: float = COLLAPSE_KL,
          collapse_perplexity_ratio: float = COLLAPSE_PERPLEXITY_RATIO, show_progress: bool | None = None
          ) -> SweepResult:
    """Behaviour rate and capability cost with the top N experts of ``ranking`` switched off (``mode``: drop
    or mask), a random control of the same shape, and the same experts forced on, for each N in ``sizes``.
    An N larger than the ranking, or one the engine cannot switch off, is skipped with a note. Ctrl-C keeps
    what was finished (``partial``)."""
    if not isinstance(model, Model):
        with Model(model) as m:
            return sweep(m, prompts, ranking, sizes, mode=mode, neutral_text=neutral_text, detector=detector,
                         n_random=n_random, seed=seed, max_tokens=max_tokens, chat=chat, temperature=temperature,
                         measure_cost=measure_cost, chunk_tokens=chunk_tokens, max_neutral_tokens=max_neutral_tokens,
                         exclude_super_experts=exclude_super_experts, collapse_kl=collapse_kl,
                         collapse_perplexity_ratio=collapse_perplexity_ratio, show_progress=show_progress)
    started = time.perf_counter()
    layout = model.layout.require_moe()
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
    texts, prompt_tokens = prepare_prompts(model, prompts, chat)
    check_settings(n_random, max_tokens, chunk_tokens)
    detector = Detector() if detector is None else detector
    strength = 1.0
    notes: list[str] = []
    if ranking.left_out:
        notes.append("super-experts left out of the ranking: " + ", ".join(f"{l}:{e}" for l, e in ranking.left_out))
    supers = cached_super_experts(model.path) or set()
    exclude = supers if exclude_super_experts else set()

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
        controls, _ = draw_random_controls(off, layout, [seed + i for i in range(n_random)], exclude, strength,
                                           notes, what=f"random N={n}")
        names = [f"random[{n}][seed={r}]" for r, _ in controls]
        plan += [Planned(name, f"random control N={n}, seed {r}", ctl, r) for name, (r, ctl) in zip(names, controls)]
        if names:
            groups[f"random[{n}]"] = (f"random control N={n}", names)
        forced = plan_forced(off, layout, strength, notes, what=f"forced N={n}")
        if forced is not None:
            plan.append(Planned(f"forced[{n}]", f"top {n} forced on", forced))
    if not points:
        raise EvalError("no sweep size could be run: " + "; ".join(notes))

    chunks, neutral_source = neutral_chunks(model, neutral_text, chunk_tokens, max_neutral_tokens) \
        if measure_cost else ([], None)
    generations, costs, partial = run_conditions(
        model, plan, texts, prompt_tokens, chunks, strength=strength, detector=detector, seed=seed,
        max_tokens=max_tokens, temperature=temperature, show_progress=show_progress, desc="sweep")
    results = summarise(plan, generations, costs, strength, groups, kl_limit=collapse_kl,
                        ppl_ratio=collapse_perplexity_ratio)
    for p in points:
        p.off, p.random, p.forced = (results.get(f"{k}[{p.n}]") for k in ("off", "random", "forced"))
    unsteered = results["unsteered"]
    warnings = []
    hit = sorted(set(ranking.experts[:points[-1].n]) & supers)
    if hit:
        warnings.append("the sweep switches off super-expert(s) " + ", ".join(f"{l}:{e}" for l, e in hit))
    for p in points:
        warnings += [f"N={p.n}, {w}" for w in collapse_warnings(p.conditions())]
        if p.n_evidence < p.n:
            notes.append(f"N={p.n}: {p.n_evidence} of the {p.n} experts carry evidence (a band above 0)")
    if partial:
        notes.append("interrupted: partial results (only finished generations are counted)")
    if not chunks:
        notes.append("capability cost not measured: a collapsed condition cannot be flagged")
    settings = {
        "sizes": sizes, "mode": mode.value, "n_prompts": len(texts), "prompts": texts, "n_random": n_random,
        "seed": seed, "max_tokens": max_tokens, "temperature": temperature,
        "decoding": "greedy" if temperature <= 0 else f"sampled (temperature {temperature})",
        "chat": chat, "chat_template": bool(chat and model.chat_template), "detector": describe_detector(detector),
        "neutral_text": neutral_source, "neutral_tokens": sum(len(c) for c in chunks), "chunks": len(chunks),
        "rate_interval": RATE_INTERVAL, "delta_interval": DELTA_INTERVAL,
        "collapse": {"kl_nats": collapse_kl, "perplexity_ratio": collapse_perplexity_ratio},
        "random_excluded_super_experts": [list(x) for x in sorted(exclude)], "notes": notes,
    }
    return SweepResult(model=str(model.path), unsteered=unsteered, points=points,
                       ranking={"source": ranking.source, "method": ranking.method,
                                "experts": [list(x) for x in ranking.experts[:max(sizes)]],
                                "evidence": [list(x) for x in sorted(ranking.evidence)],
                                "left_out": [list(x) for x in ranking.left_out]},
                       settings=settings, generations=generations, warnings=warnings, partial=partial,
                       elapsed_s=time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------------
# Table, plot, report
# --------------------------------------------------------------------------------------------------------

SWEEP_HEADERS = ("N", "evidence", "top N off [95% CI]", "Δ vs unsteered [95% CI]", "random control [95% CI]",
                 "forced on [95% CI]", "KL off", "KL random", "KL forced")


def _rate_cell(c: ConditionResult | None) -> str:
    if c is None:
        return "skipped"
    if c.rate is None:
        return "–"
    text = f"{pct(c.rate)} [{pct(c.ci[0])}, {pct(c.ci[1])}]"
    return f"{text} COLLAPSED" if c.collapsed else text


def _kl_cell(c: ConditionResult | None) -> str:
    return "–" if c is None else num(c.kl)


def sweep_rows(result: SweepResult) -> list[tuple[str, ...]]:
    return [(str(p.n), f"{p.n_evidence}/{p.n}", _rate_cell(p.off), delta_text(p.off) if p.off else "–",
             _rate_cell(p.random), _rate_cell(p.forced), _kl_cell(p.off), _kl_cell(p.random), _kl_cell(p.forced))
            for p in result.points]


def sweep_table(result: SweepResult) -> str:
    """The sweep as one terminal table: a row per N, the unsteered rate above it, warnings below."""
    u = result.unsteered
    head = [f"unsteered: {rate_text(u)}, perplexity {ppl_text(u.perplexity)}"]
    rows = text_table(SWEEP_HEADERS, sweep_rows(result), ["<", ">", ">", ">", ">", ">", ">", ">", ">"])
    return "\n".join(head + rows + footer(result.partial, result.warnings))


def sweep_figure(result: SweepResult, title: str = "mote-local sweep"):
    """Behaviour rate vs N (top N off, random control, forced on; 95% intervals; unsteered as a band), and
    mean KL vs N beside it; collapsed points marked. None without matplotlib."""
    fig = new_figure(10, 4)
    if fig is None:
        return None
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    u = result.unsteered
    if u.rate is not None:
        ax.axhline(100 * u.rate, color=COLOURS["unsteered"], lw=1, label="unsteered")
        ax.axhspan(100 * u.ci[0], 100 * u.ci[1], color=COLOURS["unsteered"], alpha=0.15, lw=0)
    series = (("off", "top N off", COLOURS["profile"], "o", -0.04), ("random", "random control", COLOURS["random"], "s", 0.0),
              ("forced", "top N forced on", COLOURS["forced"], "^", 0.04))
    collapsed_pts: list[tuple[Any, float, float]] = []
    for key, label, colour, marker, shift in series:
        xs, ys, lo, hi, kls = [], [], [], [], []
        for p in result.points:
            c = getattr(p, key)
            if c is None or c.rate is None:
                continue
            x = p.n * (1 + shift)  # a small offset on the log axis keeps the error bars apart
            xs.append(x)
            ys.append(100 * c.rate)
            lo.append(100 * (c.rate - c.ci[0]))
            hi.append(100 * (c.ci[1] - c.rate))
            kls.append((x, c.kl))
            if c.collapsed:
                collapsed_pts.append((ax, x, 100 * c.rate))
                if c.kl is not None and math.isfinite(c.kl):
                    collapsed_pts.append((ax2, x, c.kl))
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], color=colour, marker=marker, capsize=4, label=label, lw=1.2)
            finite = [(x, k) for x, k in kls if k is not None and math.isfinite(k)]
            if finite:
                ax2.plot([x for x, _ in finite], [k for _, k in finite], color=colour, marker=marker, label=label,
                         lw=1.2)
    for axis, x, y in collapsed_pts:  # ringed in both panels, named in the rates' panel
        axis.scatter([x], [y], s=160, facecolors="none", edgecolors=COLLAPSE_COLOUR, linewidths=2, zorder=4)
        if axis is ax:
            axis.annotate("collapsed", (x, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=8,
                          color=COLLAPSE_COLOUR, fontweight="bold")
    sizes = [p.n for p in result.points]
    for axis in (ax, ax2):
        axis.set_xscale("log")
        axis.set_xticks(sizes, [str(n) for n in sizes])
        axis.minorticks_off()
        axis.set_xlabel("N (top experts)")
    ax.set_ylim(-2, 112)
    ax.set_ylabel("behaviour rate (%)")
    ax.set_title("behaviour rate vs N, 95% CI", fontsize=10)
    ax.legend(fontsize=7, loc="best", frameon=False)
    kl_limit = result.settings.get("collapse", {}).get("kl_nats")
    if kl_limit:
        ax2.axhline(kl_limit, color=COLLAPSE_COLOUR, lw=0.8, ls="--", label=f"collapse ({kl_limit:g} nats)")
    ax2.set_yscale("symlog", linthresh=1e-4)  # KL 0 (nothing moved) stays on the axis
    top_kl = max([c.kl for p in result.points for c in p.conditions() if c.kl is not None and math.isfinite(c.kl)]
                 + [kl_limit or 1.0])
    ax2.set_ylim(0, top_kl * 5)
    ax2.set_ylabel("mean KL(unsteered ‖ steered), nats")
    ax2.set_title("capability cost on neutral text", fontsize=10)
    ax2.legend(fontsize=7, loc="best", frameon=False)
    fig.suptitle(title + (" (PARTIAL)" if result.partial else ""), fontsize=11)
    fig.tight_layout()
    return fig


def write_sweep_report(out_dir: str | os.PathLike, result: SweepResult, *, title: str = "mote-local sweep") -> Path:
    """Writes sweep.json, sweep.png, sweep.md and sweep.html into ``out_dir`` (each atomically). Returns the HTML
    file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", result.to_json() + "\n")
    fig = sweep_figure(result, title)
    plot = None if fig is None else png_bytes(fig)
    if plot is not None:
        atomic_write_bytes(out / PLOT_NAME, plot)
    st = result.settings
    settings = [
        ("model", result.model), ("ranking", f"{result.ranking.get('method')} from {result.ranking.get('source')}"),
        ("switched off by", st.get("mode")), ("prompts", str(st.get("n_prompts"))),
        ("decoding", f"{st.get('decoding')}, max {st.get('max_tokens')} tokens, seed {st.get('seed')}"),
        ("detector", detector_text(st.get("detector", {}))), ("random controls per N", str(st.get("n_random"))),
        ("neutral text", f"{st.get('neutral_text')}: {st.get('neutral_tokens')} tokens"),
        ("intervals", f"rate: {st.get('rate_interval')}; Δ: {st.get('delta_interval')}"),
        ("collapse", f"mean KL > {st['collapse']['kl_nats']} nats or perplexity > "
                     f"{st['collapse']['perplexity_ratio']}x unsteered"),
        ("time", f"{result.elapsed_s:.1f} s"),
    ]
    rows = sweep_rows(result)
    collapsed_rows = [any(c.collapsed for c in p.conditions()) for p in result.points]
    context = dict(title=title, partial=result.partial, warnings=result.warnings, headers=SWEEP_HEADERS,
                   unsteered=rate_text(result.unsteered), notes=st.get("notes", []), settings=settings,
                   experts=", ".join(f"{l}:{e}" for l, e in result.ranking.get("experts", [])))
    atomic_write_text(out / "sweep.md", render(
        "sweep.md", **context, plot_name=PLOT_NAME if plot else None,
        table=md_table(SWEEP_HEADERS, [tuple(md_cell(v) for v in r) for r in rows]),
        settings_table=md_table(("setting", "value"), [(k, md_cell(v)) for k, v in settings])).rstrip() + "\n")
    page = render("sweep.html", **context, rows=[{"cells": r, "collapsed": c} for r, c in zip(rows, collapsed_rows)],
                  plot=b64(plot))
    return atomic_write_text(out / "sweep.html", page.rstrip() + "\n")
