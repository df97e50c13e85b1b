"""What an fTRI run writes and shows: ftri.json (and the typed ranking read back from it), a CSV and a heatmap per
method, profile.json, and the terminal table. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mote_local.atomic import atomic_path, atomic_write_text
from mote_local.engine.model import Model
from mote_local.errors import MoteError
from mote_local.ftri.capture import CaptureRun
from mote_local.ftri.export import Export
from mote_local.ftri.stats import FtriResult, RankedExpert

FTRI_FORMAT = "mote-ftri"  # the "format" of ftri.json


@dataclass
class Ranking:
    """Experts in rank order (best first), which of them carry evidence, and where the ranking came from: what a
    sweep switches off, N at a time."""

    experts: list[tuple[int, int]]
    evidence: set[tuple[int, int]] = field(default_factory=set)
    source: str = ""
    method: str = ""
    left_out: list[tuple[int, int]] = field(default_factory=list)  # flagged super-experts not ranked


def read_ranking(
    path: str | os.PathLike,
    moe_layers: Sequence[int],
    *,
    method: str | None = None,
    exclude: Iterable[tuple[int, int]] = (),
) -> Ranking:
    """The ranking an fTRI result gives, for a sweep: ``path`` is ftri.json or the folder that holds it, ``method``
    one of its methods (default: the first): the experts ordered by score (more active on the behaviour first; MoE
    layers only; ``exclude`` left out), with evidence where their simultaneous band (per-expert interval for
    results older than the band) lies above 0, and the excluded ones that ranked as ``left_out``."""
    p = Path(path)
    if p.is_dir():
        p = p / "ftri.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoteError(f"no fTRI result at {p}: run `mote ftri MODEL --prompts FILE --out DIR` and pass DIR") from None
    except (OSError, ValueError) as err:
        raise MoteError(f"cannot read the fTRI result {p}: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FTRI_FORMAT or not isinstance(doc.get("results"), dict):
        raise MoteError(f"{p} is not an fTRI result (the ftri.json that `mote ftri` writes)")
    methods = list(doc["results"])
    method = method or (methods[0] if methods else None)
    if method not in doc["results"]:
        raise MoteError(f"{p} has no {method!r} ranking; it has {', '.join(methods) or 'none'}")
    try:
        result = FtriResult.from_dict(doc["results"][method])
    except ValueError as err:
        raise MoteError(f"{p}: {err}") from None
    if result.scores.shape[0] <= max(moe_layers, default=-1):
        raise MoteError(
            f"{p} has {result.scores.shape[0]} layers but the model routes in layers up to "
            f"{max(moe_layers)}: was it made for another model?"
        )
    ranked = [(r.layer, r.expert) for r in result.ranked(sign="positive", layers=moe_layers)]
    kind = "simultaneous" if result.se is not None else "per-expert"
    evidence = {(r.layer, r.expert) for r in result.evidence(sign="positive", layers=moe_layers, evidence=kind)[0]}
    excluded = {(int(l), int(e)) for l, e in exclude}
    return Ranking(
        [x for x in ranked if x not in excluded], evidence, str(p), str(method), [x for x in ranked if x in excluded]
    )


def ranking_table(
    result: FtriResult,
    ranked: Sequence[RankedExpert],
    truth: AbstractSet[tuple[int, int]] = frozenset(),
    *,
    threshold: float = 0.0,
    evidence: str = "simultaneous",
) -> str:
    """The ranking as a terminal table: score, per-expert 95% interval, rank stability, and whether the expert
    carries evidence for the result's sign (``qualified``, as the export asks)."""
    try:
        qualified = result.qualified(threshold=threshold, evidence=evidence)
    except ValueError:  # no band in an old result
        qualified = result.qualified(threshold=threshold, evidence="per-expert")
    lines = [
        f"{'rank':>4} {'layer':>5} {'expert':>6} {result.method:>12} {'95% CI':>19} {'stability':>9} "
        f"{'evidence':>8}" + ("  planted" if truth else "")
    ]
    for i, r in enumerate(ranked, 1):
        mark = "  *" if (r.layer, r.expert) in truth else ""
        lines.append(
            f"{i:>4} {r.layer:>5} {r.expert:>6} {r.score:>12.4f} [{r.ci_low:>8.4f},{r.ci_high:>8.4f}]"
            f" {r.stability:>9.2f} {'yes' if qualified[r.layer, r.expert] else '-':>8}{mark}"
        )
    return "\n".join(lines)


def write_heatmap(
    path: Path, result: FtriResult, moe_layers: Sequence[int], top: Sequence[RankedExpert], title: str
) -> None:
    """Layer × expert heatmap of the scores, diverging colours around 0, the top experts boxed."""
    # matplotlib's object API: no pyplot state, no process-wide backend choice made by a library
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    data = result.scores[list(moe_layers)]
    limit = float(np.abs(data).max()) or 1.0
    fig = Figure(figsize=(max(6, data.shape[1] * 0.25 + 2), max(3, len(moe_layers) * 0.35 + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(moe_layers)), [str(l) for l in moe_layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9, wrap=True)
    row = {l: i for i, l in enumerate(moe_layers)}
    for r in top:
        if r.layer in row:
            ax.add_patch(Rectangle((r.expert - 0.5, row[r.layer] - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    ax.set_xticks(
        range(data.shape[1]),
        [str(e) if data.shape[1] <= 64 or e % 8 == 0 else "" for e in range(data.shape[1])],
        fontsize=7,
    )
    fig.colorbar(im, ax=ax, label=f"{result.method} (behaviour − baseline)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_outputs(
    out: Path,
    run: CaptureRun,
    results: dict[str, FtriResult],
    model: Model,
    top: int,
    per_layer_cap: int | None,
    profile,
) -> dict[str, Path]:
    """ftri.json, one CSV and one heatmap per method, profile.json; every file written atomically. ``profile``
    is a Profile or an :class:`Export` (whose record then goes into ftri.json too). Heatmaps box each method's
    top experts that carry evidence."""
    export = profile if isinstance(profile, Export) else None
    profile = export.profile if export else profile
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    summary = {
        "format": FTRI_FORMAT,
        "version": 1,
        "model": str(model.path),
        "arch": model.layout.arch,
        "scope": run.scope,
        "partial": run.partial,
        "n_behavior": int(run.activations.n_behavior),
        "n_baseline": int(run.activations.n_baseline),
        "moe_layers": list(model.layout.moe_layers),
        "results": {m: r.to_dict() for m, r in results.items()},
        "top": {
            m: [vars(x) for x in r.ranked(top, per_layer_cap=per_layer_cap, layers=model.layout.moe_layers)]
            for m, r in results.items()
        },
        **({"export": export.to_dict()} if export else {}),
    }
    paths["json"] = out / "ftri.json"
    atomic_write_text(paths["json"], json.dumps(summary, indent=1))
    for method, result in results.items():
        ranked = result.ranked(layers=model.layout.moe_layers)
        buf = io.StringIO()
        w = csv.writer(buf)
        band_low, band_high = result.band()
        qualified = result.qualified(sign="abs")
        w.writerow(
            ["rank", "layer", "expert", "score", "ci_low", "ci_high", "band_low", "band_high", "stability", "evidence"]
        )
        for i, r in enumerate(ranked, 1):
            w.writerow(
                [
                    i,
                    r.layer,
                    r.expert,
                    f"{r.score:.6g}",
                    f"{r.ci_low:.6g}",
                    f"{r.ci_high:.6g}",
                    f"{band_low[r.layer, r.expert]:.6g}",
                    f"{band_high[r.layer, r.expert]:.6g}",
                    f"{r.stability:.4g}",
                    int(qualified[r.layer, r.expert]),
                ]
            )
        paths[f"csv_{method}"] = out / f"ftri_{method}.csv"
        atomic_write_text(paths[f"csv_{method}"], buf.getvalue())
        paths[f"png_{method}"] = out / f"heatmap_{method}.png"
        write_heatmap(
            paths[f"png_{method}"],
            result,
            model.layout.moe_layers,
            result.evidence(top, per_layer_cap=per_layer_cap, layers=model.layout.moe_layers)[0],
            f"fTRI {method}, {run.scope} tokens{', partial' if run.partial else ''}\n{model.path.name}",
        )
    paths["profile"] = out / "profile.json"
    profile.save(paths["profile"])
    return paths
