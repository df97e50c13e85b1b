"""Evaluation and sweep reports: a terminal table, and a folder with JSON, Markdown, a plot and a self-contained
HTML page (the one home of both renderings).

    out = write_report("eval-out", result, ftri_heatmap=Path("ftri/heatmap.png"), ftri_table=table_text)

writes ``eval-out/report.json`` (the :class:`~mote_local.evaluation.evaluate.EvalResult`, readable back with
``EvalResult.from_json``), ``report.md``, ``behaviour.png`` (behaviour rate per condition with its 95%
interval, and KL per condition) and ``report.html`` (everything in one file, images embedded), each written
atomically. The HTML and Markdown come from the jinja2 templates in ``templates/``; model text is escaped
everywhere it is shown. A condition whose capability cost says the model collapsed is marked in the table, the
plot and the report. ``write_sweep_report`` does the same for a sweep: ``sweep.json``, ``sweep.md``, ``sweep.png``
(rate vs N, KL beside it) and ``sweep.html``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from mote_local.atomic import atomic_write_bytes, atomic_write_text
from mote_local.evaluation.evaluate import ConditionResult, EvalResult
from mote_local.evaluation.sweep import SweepResult

__all__ = [
    "format_table",
    "table_rows",
    "plot_png",
    "write_report",
    "markdown_report",
    "html_report",
    "render",
    "md_cell",
    "md_table",
    "sweep_table",
    "sweep_figure",
    "write_sweep_report",
]

DEFAULT_TITLE = "mote-local evaluation"
PLOT_NAME = "behaviour.png"
SWEEP_PLOT_NAME = "sweep.png"
HEATMAP_NAME = "ftri_heatmap.png"
COLLAPSED = "COLLAPSED"
_HEADERS = ("condition", "behaviour rate [95% CI]", "Δ vs unsteered [95% CI]", "KL (nats)", "perplexity")
COLOURS = {"unsteered": "#7f7f7f", "profile": "#d62728", "random": "#1f77b4", "forced": "#2ca02c"}
COLLAPSE_COLOUR = "#b00020"


# --------------------------------------------------------------------------------------------------------
# Numbers as text
# --------------------------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def rate_text(c: ConditionResult) -> str:
    if c.rate is None or c.ci is None:  # set together
        return "– (no generations)"
    lo, hi = c.ci
    return f"{pct(c.rate)} [{pct(lo)}, {pct(hi)}]  ({c.hits}/{c.n})"


def _signed_pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def delta_text(c: ConditionResult) -> str:
    if c.delta is None or c.delta_ci is None:  # set together
        return "–"
    if c.name == "unsteered":
        return "0 (reference)"
    lo, hi = c.delta_ci
    return f"{_signed_pct(c.delta)} pp [{_signed_pct(lo)}, {_signed_pct(hi)}]"


def num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "inf"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10**-digits):
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def ppl_text(x: float | None) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.4g}" if x >= 1e4 else f"{x:.2f}"


def marked(label: str, c: ConditionResult) -> str:
    """A row label, marked when the condition collapsed."""
    return f"{label}  [{COLLAPSED}]" if c.collapsed else label


def table_rows(result: EvalResult, *, seeds: bool = True) -> list[tuple[str, str, str, str, str]]:
    """The rows of the results table as text: one per condition, then (indented) the random control's seeds.
    A collapsed condition's label carries [COLLAPSED]."""
    rows = []
    for c in result.conditions:
        rows.append((marked(c.label, c), rate_text(c), delta_text(c), num(c.kl), ppl_text(c.perplexity)))
        if seeds:
            for s in c.per_seed:
                rows.append(
                    (marked(f"  seed {s.seed}", s), rate_text(s), delta_text(s), num(s.kl), ppl_text(s.perplexity))
                )
    return rows


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    """Columns padded to their widest cell, a dashed rule under the header."""
    table = [tuple(headers), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(r, align, widths)).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def footer(partial: bool, warnings: Sequence[str]) -> list[str]:
    out = ["PARTIAL: the run was interrupted; only finished generations are counted."] if partial else []
    return out + [f"warning: {w}" for w in warnings]


def format_table(result: EvalResult) -> str:
    """One table for the terminal: condition, behaviour rate [95% CI], Δ vs unsteered, KL, perplexity; then
    warnings (a collapsed condition among them)."""
    out = text_table(_HEADERS, table_rows(result), ["<", ">", ">", ">", ">"])
    return "\n".join(out + footer(result.partial, result.warnings))


# --------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg renderer (no pyplot global state), or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def figure(result: EvalResult, title: str = DEFAULT_TITLE):
    """The report's figure: behaviour rate per condition with its 95% interval (each random seed as a dot),
    and mean KL per condition; collapsed conditions hatched and labelled. None without matplotlib."""
    fig = new_figure(9, 3.8)
    if fig is None:
        return None
    conds = result.conditions
    names = [c.label for c in conds]
    x = list(range(len(conds)))
    colours = [colours_for(c) for c in conds]
    hatches = ["//" if c.collapsed else "" for c in conds]
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    rates = [100 * (c.rate or 0.0) for c in conds]
    lower = [100 * ((c.rate or 0.0) - c.ci[0]) if c.ci else 0.0 for c in conds]
    upper = [100 * (c.ci[1] - (c.rate or 0.0)) if c.ci else 0.0 for c in conds]
    bars = ax.bar(x, rates, color=colours, alpha=0.85, yerr=[lower, upper], capsize=6, ecolor="black")
    for i, c in enumerate(conds):
        if c.per_seed:
            pts = [100 * s.rate for s in c.per_seed if s.rate is not None]
            ax.scatter([i + 0.25] * len(pts), pts, color="black", s=14, zorder=3, label="random seeds" if pts else None)
        if c.rate is None:
            ax.text(i, 2, "n/a", ha="center", fontsize=8)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 118)  # headroom for the legend above the 100% line
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("behaviour rate (%)")
    ax.set_title("behaviour rate, 95% CI", fontsize=10)
    if any(c.per_seed for c in conds):
        ax.legend(fontsize=7, loc="upper left", frameon=False)

    kls = [c.kl if c.kl is not None and math.isfinite(c.kl) else 0.0 for c in conds]
    bars2 = ax2.bar(x, kls, color=colours, alpha=0.85)
    for i, c in enumerate(conds):
        if c.kl is None or not math.isfinite(c.kl):
            ax2.text(i, 0, "n/a" if c.kl is None else "inf", ha="center", va="bottom", fontsize=8)
    if any(k > 0 for k in kls) and max(kls) / max(min(k for k in kls if k > 0), 1e-12) > 1e3:
        ax2.set_yscale("symlog", linthresh=1e-3)  # a collapse beside a nudge: both visible
    ax2.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax2.set_ylabel("mean KL(unsteered ‖ steered), nats")
    ax2.set_title("capability cost on neutral text", fontsize=10)
    for i, c in enumerate(conds):
        if c.collapsed:
            for b in (bars[i], bars2[i]):
                b.set_hatch(hatches[i])
                b.set_edgecolor(COLLAPSE_COLOUR)
            ax.text(i, rates[i] + 6, "collapsed", ha="center", fontsize=8, color=COLLAPSE_COLOUR, fontweight="bold")
            ax2.text(
                i, kls[i], "collapsed", ha="center", va="bottom", fontsize=8, color=COLLAPSE_COLOUR, fontweight="bold"
            )
    fig.suptitle(title + (" (PARTIAL)" if result.partial else ""), fontsize=11)
    fig.tight_layout()
    return fig


def colours_for(c: ConditionResult) -> str:
    return COLOURS.get(c.name, "#9467bd")


def plot_png(result: EvalResult, title: str = DEFAULT_TITLE) -> bytes | None:
    """The report's figure (:func:`figure`) as PNG bytes; None when matplotlib is not installed."""
    fig = figure(result, title)
    return None if fig is None else png_bytes(fig)


# --------------------------------------------------------------------------------------------------------
# Markdown and HTML, from templates
# --------------------------------------------------------------------------------------------------------


def md_text(text: Any) -> str:
    """Text in Markdown prose: HTML-escaped (model text may hold markup)."""
    return html.escape(str(text))


def md_cell(text: Any) -> str:
    """Model text in a Markdown table cell: HTML-escaped, one line, pipes escaped."""
    s = html.escape(str(text)).replace("\r", "").replace("\n", " ⏎ ").replace("|", "\\|")
    return s if s.strip() else "*(empty)*"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mote_local.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["md_cell"] = md_cell
    env.filters["md_text"] = md_text
    return env


def render(template: str, **context: Any) -> str:
    """A report template (``templates/<template>``) filled in; .html templates escape every value."""
    return _environment().get_template(template).render(**context)


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _entry_text(e: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return (str(e["layer"]), str(e["expert"]), e["mode"], str(e.get("value", "")), e.get("scope", "all"))


def _sample_columns(result: EvalResult) -> list[str]:
    cols: list[str] = []
    for s in result.samples:
        for k in s["responses"]:
            if k not in cols:
                cols.append(k)
    return cols


def _column_label(result: EvalResult, key: str) -> str:
    seeds = result.settings.get("random_seeds") or []
    return f"random (seed {seeds[0]})" if key == "random" and seeds else key


def detector_text(det: dict[str, Any]) -> str:
    if det.get("kind") == "phrases":
        return f"{len(det.get('phrases', []))} phrases, {len(det.get('regexes', []))} regexes"
    if det.get("kind") == "judge":
        return f"judge model {Path(det.get('model', '')).name}: {det.get('question', '')}"
    return str(det.get("repr", det.get("kind", "?")))


def collapse_text(st: dict[str, Any]) -> str:
    c = st.get("collapse") or {}
    if not c:
        return "–"
    return (
        f"flagged when mean KL > {c.get('kl_nats')} nats or perplexity > {c.get('perplexity_ratio')}x the unsteered one"
    )


def _settings_lines(result: EvalResult) -> list[tuple[str, str]]:
    st = result.settings
    return [
        ("model", result.model),
        ("prompts", str(st.get("n_prompts"))),
        (
            "decoding",
            f"{st.get('decoding')}, max {st.get('max_tokens')} tokens, seed {st.get('seed')}, "
            f"chat template {'on' if st.get('chat_template') else 'off'}",
        ),
        ("detector", detector_text(st.get("detector", {}))),
        ("random controls", f"{st.get('n_random')} (seeds {st.get('random_seeds')})"),
        ("neutral text", f"{st.get('neutral_text')}: {st.get('neutral_tokens')} tokens in {st.get('chunks')} chunk(s)"),
        ("intervals", f"rate: {st.get('rate_interval')}; Δ: {st.get('delta_interval')}"),
        ("collapse", collapse_text(st)),
        ("time", f"{result.elapsed_s:.1f} s"),
    ]


def _rows(result: EvalResult) -> list[dict[str, Any]]:
    rows = []
    for c in result.conditions:
        for row, seed in [(c, False), *[(s, True) for s in c.per_seed]]:
            rows.append(
                {
                    "label": f"seed {row.seed}" if seed else row.label,
                    "seed": seed,
                    "collapsed": row.collapsed,
                    "collapse": row.collapse or "",
                    "cells": [rate_text(row), delta_text(row), num(row.kl), ppl_text(row.perplexity)],
                }
            )
    return rows


def markdown_report(
    result: EvalResult,
    *,
    title: str = DEFAULT_TITLE,
    plot_name: str | None = PLOT_NAME,
    heatmap_name: str | None = None,
    ftri_table: str | None = None,
) -> str:
    cols = _sample_columns(result)
    samples = []
    for s in result.samples:
        rows = [
            (
                _column_label(result, k),
                md_cell(s["responses"][k]) if k in s["responses"] else "–",
                "yes" if s["detected"].get(k) else "no",
            )
            for k in cols
        ]
        samples.append({"prompt": s["prompt"], "table": md_table(("condition", "response", "behaviour"), rows)})
    p = result.profile
    text = render(
        "report.md",
        title=title,
        partial=result.partial,
        warnings=result.warnings,
        results_table=md_table(_HEADERS, [tuple(md_cell(v) for v in r) for r in table_rows(result)]),
        plot_name=plot_name,
        notes=result.settings.get("notes", []),
        settings_table=md_table(("setting", "value"), [(k, md_cell(v)) for k, v in _settings_lines(result)]),
        profile=p,
        profile_table=md_table(
            ("layer", "expert", "mode", "value", "scope"), [_entry_text(e) for e in p.get("entries", [])]
        ),
        heatmap_name=heatmap_name,
        ftri_table=ftri_table,
        samples=samples,
    )
    return text.rstrip() + "\n"


def html_report(
    result: EvalResult,
    *,
    title: str = DEFAULT_TITLE,
    plot: bytes | None = None,
    heatmap: bytes | None = None,
    ftri_table: str | None = None,
) -> str:
    p = result.profile
    page = render(
        "report.html",
        title=title,
        partial=result.partial,
        warnings=result.warnings,
        headers=_HEADERS,
        rows=_rows(result),
        plot=b64(plot),
        notes=result.settings.get("notes", []),
        settings=_settings_lines(result),
        profile=p,
        entries=[_entry_text(e) for e in p.get("entries", [])],
        heatmap=b64(heatmap),
        ftri_table=ftri_table,
        samples=result.samples,
        sample_columns=[{"key": k, "label": _column_label(result, k)} for k in _sample_columns(result)],
    )
    return page.rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def write_report(
    out_dir: str | os.PathLike,
    result: EvalResult,
    *,
    ftri_heatmap: Path | None = None,
    ftri_table: str | None = None,
    title: str = DEFAULT_TITLE,
) -> Path:
    """Writes report.json, report.md, behaviour.png and report.html into ``out_dir`` (each atomically; the
    fTRI heatmap, when given, is copied next to them for the Markdown). Returns the HTML file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heatmap = None
    if ftri_heatmap is not None:
        try:
            heatmap = Path(ftri_heatmap).read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"cannot read the fTRI heatmap {ftri_heatmap}: {err}") from None
        atomic_write_bytes(out / HEATMAP_NAME, heatmap)
    atomic_write_text(out / "report.json", result.to_json() + "\n")
    plot = plot_png(result, title)
    if plot is not None:
        atomic_write_bytes(out / PLOT_NAME, plot)
    atomic_write_text(
        out / "report.md",
        markdown_report(
            result,
            title=title,
            plot_name=PLOT_NAME if plot else None,
            heatmap_name=HEATMAP_NAME if heatmap else None,
            ftri_table=ftri_table,
        ),
    )
    return atomic_write_text(
        out / "report.html", html_report(result, title=title, plot=plot, heatmap=heatmap, ftri_table=ftri_table)
    )


# --------------------------------------------------------------------------------------------------------
# The sweep: table, plot, report
# --------------------------------------------------------------------------------------------------------

SWEEP_HEADERS = (
    "N",
    "evidence",
    "top N off [95% CI]",
    "Δ vs unsteered [95% CI]",
    "random control [95% CI]",
    "forced on [95% CI]",
    "KL off",
    "KL random",
    "KL forced",
)


def _rate_cell(c: ConditionResult | None) -> str:
    if c is None:
        return "skipped"
    if c.rate is None or c.ci is None:  # set together
        return "–"
    text = f"{pct(c.rate)} [{pct(c.ci[0])}, {pct(c.ci[1])}]"
    return f"{text} COLLAPSED" if c.collapsed else text


def _kl_cell(c: ConditionResult | None) -> str:
    return "–" if c is None else num(c.kl)


def sweep_rows(result: SweepResult) -> list[tuple[str, ...]]:
    return [
        (
            str(p.n),
            f"{p.n_evidence}/{p.n}",
            _rate_cell(p.off),
            delta_text(p.off) if p.off else "–",
            _rate_cell(p.random),
            _rate_cell(p.forced),
            _kl_cell(p.off),
            _kl_cell(p.random),
            _kl_cell(p.forced),
        )
        for p in result.points
    ]


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
    if u.rate is not None and u.ci is not None:  # set together
        ax.axhline(100 * u.rate, color=COLOURS["unsteered"], lw=1, label="unsteered")
        ax.axhspan(100 * u.ci[0], 100 * u.ci[1], color=COLOURS["unsteered"], alpha=0.15, lw=0)
    series = (
        ("off", "top N off", COLOURS["profile"], "o", -0.04),
        ("random", "random control", COLOURS["random"], "s", 0.0),
        ("forced", "top N forced on", COLOURS["forced"], "^", 0.04),
    )
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
                ax2.plot(
                    [x for x, _ in finite], [k for _, k in finite], color=colour, marker=marker, label=label, lw=1.2
                )
    for axis, x, y in collapsed_pts:  # ringed in both panels, named in the rates' panel
        axis.scatter([x], [y], s=160, facecolors="none", edgecolors=COLLAPSE_COLOUR, linewidths=2, zorder=4)
        if axis is ax:
            axis.annotate(
                "collapsed",
                (x, y),
                textcoords="offset points",
                xytext=(0, 9),
                ha="center",
                fontsize=8,
                color=COLLAPSE_COLOUR,
                fontweight="bold",
            )
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
    top_kl = max(
        [c.kl for p in result.points for c in p.conditions() if c.kl is not None and math.isfinite(c.kl)]
        + [kl_limit or 1.0]
    )
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
        atomic_write_bytes(out / SWEEP_PLOT_NAME, plot)
    st = result.settings
    settings = [
        ("model", result.model),
        ("ranking", f"{result.ranking.get('method')} from {result.ranking.get('source')}"),
        ("switched off by", st.get("mode")),
        ("prompts", str(st.get("n_prompts"))),
        ("decoding", f"{st.get('decoding')}, max {st.get('max_tokens')} tokens, seed {st.get('seed')}"),
        ("detector", detector_text(st.get("detector", {}))),
        ("random controls per N", str(st.get("n_random"))),
        ("neutral text", f"{st.get('neutral_text')}: {st.get('neutral_tokens')} tokens"),
        ("intervals", f"rate: {st.get('rate_interval')}; Δ: {st.get('delta_interval')}"),
        (
            "collapse",
            f"mean KL > {st['collapse']['kl_nats']} nats or perplexity > "
            f"{st['collapse']['perplexity_ratio']}x unsteered",
        ),
        ("time", f"{result.elapsed_s:.1f} s"),
    ]
    rows = sweep_rows(result)
    collapsed_rows = [any(c.collapsed for c in p.conditions()) for p in result.points]
    context = dict(
        title=title,
        partial=result.partial,
        warnings=result.warnings,
        headers=SWEEP_HEADERS,
        unsteered=rate_text(result.unsteered),
        notes=st.get("notes", []),
        settings=settings,
        experts=", ".join(f"{l}:{e}" for l, e in result.ranking.get("experts", [])),
    )
    atomic_write_text(
        out / "sweep.md",
        render(
            "sweep.md",
            **context,
            plot_name=SWEEP_PLOT_NAME if plot else None,
            table=md_table(SWEEP_HEADERS, [tuple(md_cell(v) for v in r) for r in rows]),
            settings_table=md_table(("setting", "value"), [(k, md_cell(v)) for k, v in settings]),
        ).rstrip()
        + "\n",
    )
    page = render(
        "sweep.html",
        **context,
        rows=[{"cells": r, "collapsed": c} for r, c in zip(rows, collapsed_rows)],
        plot=b64(plot),
    )
    return atomic_write_text(out / "sweep.html", page.rstrip() + "\n")
