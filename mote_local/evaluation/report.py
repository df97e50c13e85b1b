"""Evaluation reports: a terminal table, and a folder with JSON, Markdown, a plot and a self-contained HTML page.

    out = write_report("eval-out", result, ftri_heatmap=Path("ftri/heatmap.png"), ftri_table=table_text)

writes ``eval-out/report.json`` (the :class:`~mote_local.evaluation.evaluate.EvalResult`, readable back with
``EvalResult.from_json``), ``report.md``, ``behaviour.png`` (behaviour rate per condition with its Wilson 95%
interval, and KL per condition) and ``report.html`` (everything in one file, images embedded), each written
atomically. Model text is escaped everywhere it is shown.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from mote_local.atomic import atomic_write_bytes, atomic_write_text
from mote_local.evaluation.evaluate import ConditionResult, EvalResult

__all__ = ["format_table", "table_rows", "plot_png", "write_report", "markdown_report", "html_report"]

DEFAULT_TITLE = "mote-local evaluation"
PLOT_NAME = "behaviour.png"
HEATMAP_NAME = "ftri_heatmap.png"
_HEADERS = ("condition", "behaviour rate [95% CI]", "Δ vs unsteered [95% CI]", "KL (nats)", "perplexity")


# --------------------------------------------------------------------------------------------------------
# Numbers as text
# --------------------------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _rate(c: ConditionResult) -> str:
    if c.rate is None:
        return "– (no generations)"
    lo, hi = c.ci
    return f"{_pct(c.rate)} [{_pct(lo)}, {_pct(hi)}]  ({c.hits}/{c.n})"


def _signed_pct(x: float) -> str:
    return f"{100 * x:+.1f}"


def _delta(c: ConditionResult) -> str:
    if c.delta is None:
        return "–"
    if c.name == "unsteered":
        return "0 (reference)"
    lo, hi = c.delta_ci
    return f"{_signed_pct(c.delta)} pp [{_signed_pct(lo)}, {_signed_pct(hi)}]"


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "inf"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -digits):
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def _ppl(x: float | None) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "inf"
    return f"{x:.4g}" if x >= 1e4 else f"{x:.2f}"


def table_rows(result: EvalResult, *, seeds: bool = True) -> list[tuple[str, str, str, str, str]]:
    """The rows of the results table as text: one per condition, then (indented) the random control's seeds."""
    rows = []
    for c in result.conditions:
        rows.append((c.label, _rate(c), _delta(c), _num(c.kl), _ppl(c.perplexity)))
        if seeds:
            for s in c.per_seed:
                rows.append((f"  seed {s.seed}", _rate(s), _delta(s), _num(s.kl), _ppl(s.perplexity)))
    return rows


def format_table(result: EvalResult) -> str:
    """One table for the terminal: condition, behaviour rate [95% CI], Δ vs unsteered, KL, perplexity."""
    rows = [_HEADERS, *table_rows(result)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADERS))]
    align = ["<", ">", ">", ">", ">"]

    def line(r: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(r, align, widths)).rstrip()

    out = [line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    if result.partial:
        out.append("PARTIAL: the evaluation was interrupted; only finished generations are counted.")
    for w in result.warnings:
        out.append(f"warning: {w}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------

def plot_png(result: EvalResult, title: str = DEFAULT_TITLE) -> bytes | None:
    """The report's figure as PNG bytes: behaviour rate per condition with Wilson 95% error bars (each random
    seed as a dot), and mean KL per condition. None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    conds = result.conditions
    names = [c.label for c in conds]
    x = list(range(len(conds)))
    colours = {"unsteered": "#7f7f7f", "profile": "#d62728", "random": "#1f77b4", "forced": "#2ca02c"}

    fig = Figure(figsize=(9, 3.8), dpi=100)
    FigureCanvasAgg(fig)  # the Agg renderer, without pyplot's global state
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    rates = [100 * (c.rate or 0.0) for c in conds]
    lower = [100 * ((c.rate or 0.0) - c.ci[0]) if c.ci else 0.0 for c in conds]
    upper = [100 * (c.ci[1] - (c.rate or 0.0)) if c.ci else 0.0 for c in conds]
    ax.bar(x, rates, color=[colours.get(c.name, "#9467bd") for c in conds], alpha=0.85,
           yerr=[lower, upper], capsize=6, ecolor="black")
    for i, c in enumerate(conds):
        if c.per_seed:
            pts = [100 * s.rate for s in c.per_seed if s.rate is not None]
            ax.scatter([i + 0.25] * len(pts), pts, color="black", s=14, zorder=3,
                       label="random seeds" if pts else None)
        if c.rate is None:
            ax.text(i, 2, "n/a", ha="center", fontsize=8)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 118)  # headroom for the legend above the 100% line
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("behaviour rate (%)")
    ax.set_title("behaviour rate, Wilson 95% CI", fontsize=10)
    if any(c.per_seed for c in conds):
        ax.legend(fontsize=7, loc="upper left", frameon=False)

    kls = [c.kl if c.kl is not None and math.isfinite(c.kl) else 0.0 for c in conds]
    ax2.bar(x, kls, color=[colours.get(c.name, "#9467bd") for c in conds], alpha=0.85)
    for i, c in enumerate(conds):
        if c.kl is None or not math.isfinite(c.kl):
            ax2.text(i, 0, "n/a" if c.kl is None else "inf", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax2.set_ylabel("mean KL(unsteered ‖ steered), nats")
    ax2.set_title("capability cost on neutral text", fontsize=10)
    fig.suptitle(title + (" (PARTIAL)" if result.partial else ""), fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------

def _md_cell(text: Any) -> str:
    """Model text in a Markdown table cell: HTML-escaped, one line, pipes escaped."""
    s = html.escape(str(text)).replace("\r", "").replace("\n", " ⏎ ").replace("|", "\\|")
    return s if s.strip() else "*(empty)*"


def _entry_text(e: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return (str(e["layer"]), str(e["expert"]), e["mode"], str(e.get("value", "")), e.get("scope", "all"))


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


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


def _settings_lines(result: EvalResult) -> list[tuple[str, str]]:
    st = result.settings
    det = st.get("detector", {})
    if det.get("kind") == "phrases":
        dtext = f"{len(det.get('phrases', []))} phrases, {len(det.get('regexes', []))} regexes"
    elif det.get("kind") == "judge":
        dtext = f"judge model {Path(det.get('model', '')).name}: {det.get('question', '')}"
    else:
        dtext = str(det.get("repr", det.get("kind", "?")))
    return [
        ("model", result.model),
        ("prompts", str(st.get("n_prompts"))),
        ("decoding", f"{st.get('decoding')}, max {st.get('max_tokens')} tokens, seed {st.get('seed')}, "
                     f"chat template {'on' if st.get('chat_template') else 'off'}"),
        ("detector", dtext),
        ("random controls", f"{st.get('n_random')} (seeds {st.get('random_seeds')})"),
        ("neutral text", f"{st.get('neutral_text')}: {st.get('neutral_tokens')} tokens in {st.get('chunks')} chunk(s)"),
        ("intervals", f"rate: {st.get('rate_interval')}; Δ: {st.get('delta_interval')}"),
        ("time", f"{result.elapsed_s:.1f} s"),
    ]


def markdown_report(result: EvalResult, *, title: str = DEFAULT_TITLE, plot_name: str | None = PLOT_NAME,
                    heatmap_name: str | None = None, ftri_table: str | None = None) -> str:
    L: list[str] = [f"# {html.escape(title)}", ""]
    if result.partial:
        L += ["> **PARTIAL** — the evaluation was interrupted; only finished generations are counted.", ""]
    for w in result.warnings:
        L += [f"> **warning:** {html.escape(w)}", ""]
    L += ["## Results", ""]
    L += _md_table(_HEADERS, [tuple(_md_cell(v) for v in r) for r in table_rows(result)])
    L.append("")
    if plot_name:
        L += [f"![behaviour rate per condition]({plot_name})", ""]
    for n in result.settings.get("notes", []):
        L.append(f"- {html.escape(n)}")
    L += ["", "## Settings", ""]
    L += _md_table(("setting", "value"), [(k, _md_cell(v)) for k, v in _settings_lines(result)])
    p = result.profile
    L += ["", "## Profile", "",
          f"{html.escape(p.get('name') or '(unnamed)')}: {p.get('n_experts')} experts, "
          f"{p.get('n_entries')} entries, strength {p.get('strength')}", ""]
    L += _md_table(("layer", "expert", "mode", "value", "scope"), [_entry_text(e) for e in p.get("entries", [])])
    if heatmap_name or ftri_table:
        L += ["", "## fTRI", ""]
        if heatmap_name:
            L += [f"![fTRI heatmap]({heatmap_name})", ""]
        if ftri_table:
            L += ["```", ftri_table.replace("```", "ʼʼʼ"), "```"]
    if result.samples:
        cols = _sample_columns(result)
        L += ["", "## Sample responses", ""]
        for i, s in enumerate(result.samples, 1):
            L += [f"**{i}.** {_md_cell(s['prompt'])}", ""]
            rows = [(_column_label(result, k), _md_cell(s["responses"][k]) if k in s["responses"] else "–",
                     "yes" if s["detected"].get(k) else "no") for k in cols]
            L += _md_table(("condition", "response", "behaviour"), rows)
            L.append("")
    return "\n".join(L).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.seed td { color: #666; font-size: 0.9em; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em 1em; margin: 0.6em 0; }
.hit { background: #fde2e2; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
td.resp { white-space: pre-wrap; max-width: 28em; }
img { max-width: 100%; }
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def html_report(result: EvalResult, *, title: str = DEFAULT_TITLE, plot: bytes | None = None,
                heatmap: bytes | None = None, ftri_table: str | None = None) -> str:
    e = html.escape
    H: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                    f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if result.partial:
        H.append('<div class="banner"><b>PARTIAL</b> — the evaluation was interrupted; only finished '
                 "generations are counted.</div>")
    for w in result.warnings:
        H.append(f'<div class="banner"><b>warning:</b> {e(w)}</div>')

    H.append("<h2>Results</h2>")
    H.append('<table id="results"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in _HEADERS)
             + "</tr></thead><tbody>")
    for c in result.conditions:
        for row, seed in [(c, False), *[(s, True) for s in c.per_seed]]:
            label = f"seed {row.seed}" if seed else row.label
            cells = [_rate(row), _delta(row), _num(row.kl), _ppl(row.perplexity)]
            H.append(f'<tr class="{"seed" if seed else "condition"}"><td>{"&nbsp;&nbsp;" if seed else ""}'
                     f"{e(label)}</td>" + "".join(f'<td class="num">{e(v)}</td>' for v in cells) + "</tr>")
    H.append("</tbody></table>")
    if plot:
        H.append(_img(plot, "behaviour rate per condition"))
    else:
        H.append("<p><i>(no plot: matplotlib is not installed)</i></p>")
    notes = result.settings.get("notes", [])
    if notes:
        H.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")

    H.append("<h2>Settings</h2><table>")
    H += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _settings_lines(result)]
    H.append("</table>")

    p = result.profile
    H.append(f"<h2>Profile</h2><p>{e(p.get('name') or '(unnamed)')}: {p.get('n_experts')} experts, "
             f"{p.get('n_entries')} entries, strength {e(str(p.get('strength')))}</p>")
    if p.get("description"):
        H.append(f"<p>{e(p['description'])}</p>")
    H.append('<table id="profile"><tr><th>layer</th><th>expert</th><th>mode</th><th>value</th><th>scope</th></tr>')
    for ent in p.get("entries", []):
        H.append("<tr>" + "".join(f"<td>{e(v)}</td>" for v in _entry_text(ent)) + "</tr>")
    H.append("</table>")

    if heatmap or ftri_table:
        H.append("<h2>fTRI</h2>")
        if heatmap:
            H.append(_img(heatmap, "fTRI heatmap"))
        if ftri_table:
            H.append(f"<pre>{e(ftri_table)}</pre>")

    if result.samples:
        cols = _sample_columns(result)
        H.append('<h2>Sample responses</h2><table id="samples"><tr><th>prompt</th>'
                 + "".join(f"<th>{e(_column_label(result, k))}</th>" for k in cols) + "</tr>")
        for s in result.samples:
            cells = []
            for k in cols:
                if k not in s["responses"]:
                    cells.append("<td>–</td>")
                    continue
                hit = s["detected"].get(k)
                text = s["responses"][k]
                cells.append(f'<td class="resp{" hit" if hit else ""}" title="{"behaviour" if hit else ""}">'
                             f"{e(text) if text.strip() else '<i>(empty)</i>'}</td>")
            H.append(f'<tr><td class="resp">{e(s["prompt"])}</td>' + "".join(cells) + "</tr>")
        H.append("</table><p>Highlighted: the detector called the response the behaviour.</p>")
    H.append("</body></html>")
    return "\n".join(H) + "\n"


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------

def write_report(out_dir: str | os.PathLike, result: EvalResult, *, ftri_heatmap: Path | None = None,
                 ftri_table: str | None = None, title: str = DEFAULT_TITLE) -> Path:
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
    atomic_write_text(out / "report.md", markdown_report(
        result, title=title, plot_name=PLOT_NAME if plot else None,
        heatmap_name=HEATMAP_NAME if heatmap else None, ftri_table=ftri_table))
    return atomic_write_text(out / "report.html", html_report(result, title=title, plot=plot, heatmap=heatmap,
                                                                ftri_table=ftri_table))
