"""fTRI runs: capture routing per prompt on the engine, score it, and write what a person reads.

Capture puts many prompts in one decode call (one sequence each, bound to its own label), so a
prompt set costs a few batched decodes; the statistics live in ftri_stats (pure numpy).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mote_local.atomic import atomic_path, atomic_write_text
from mote_local.engine.model import Model
from mote_local.engine.options import require_fit
from mote_local.errors import MoteError
from mote_local.ftri.stats import (
    MIN_BOOT_EVIDENCE,
    OUTPUT_METHODS,
    Activations,
    FtriResult,
    RankedExpert,
    analyse,
)
from mote_local.progress import progress_bar
from mote_local.prompts import Prompt
from mote_local.steering.entries import Entry, Mode
from mote_local.steering.profile import Profile, ProfileError

SCOPES = ("prompt", "target", "generated", "thinking")
FTRI_FORMAT = "mote-ftri"  # the "format" of ftri.json

# Options for a Model loaded to capture routing on the CPU: llama.cpp's repacked quantized weights
# are slower for MoE expert matmuls and sit in memory beside the mapped file (bench/RESULTS.md:
# Q4_K_M capture 1.15-1.28x faster at 63% of the memory without them).
CAPTURE_MODEL_OPTIONS = {"use_extra_bufts": False}

# Tokens one batch's KV cache may hold: bounds the memory of batches of long prompts.
MAX_BATCH_TOKENS = 16384
# Every counted token must be an output (the last layer routes only outputs), so llama.cpp keeps n_batch x n_vocab
# logits per decode call even when none are copied out: tokens per call are capped to hold that buffer to this size
# (a 4k vocabulary keeps 2048 tokens per call; Qwen's 151,936 about 110).
LOGITS_BUFFER_BYTES = 64 * 2**20


@dataclass
class CaptureRun:
    activations: Activations
    prompts: list[Prompt]        # in capture order: the two classes interleaved
    scope: str
    partial: bool                # interrupted: only the prompts captured so far
    texts: list[str]             # what was fed to the model (after the chat template)


def _sequences(model: Model, prompts: Sequence[Prompt], scope: str, chat: bool, n_ctx: int, max_new_tokens: int
               ) -> tuple[list[list[int]], list[tuple[int, int]], list[str]]:
    """Token sequences to decode, the [begin, end) positions to count in each, and the texts fed.

    Generated scopes decode the prompts and count what the model generates from them (their spans
    are placeholders: the tokens are not known yet).
    """
    generating = scope in ("generated", "thinking")
    sequences, spans, texts = [], [], []
    for p in prompts:
        text = model.prompt_text(p.text, chat=chat)
        toks = model.prompt_tokens(p.text, chat=chat)
        require_fit(len(toks) + (max_new_tokens if generating else 0), n_ctx,
                    f"the prompt {p.describe()}{' with its generation' if generating else ''}")
        texts.append(text)
        if scope == "target":
            if p.response is None:
                raise MoteError(f"scope 'target' needs a paired response for every prompt; "
                                f"{p.text!r} (class {p.cls}) has none")
            resp = model.tokenize(p.response, add_bos=False)
            sequences.append(toks + resp)
            spans.append((len(toks), len(toks) + len(resp)))
        else:
            sequences.append(toks)
            spans.append((0, len(toks)) if scope == "prompt" else (len(toks), -1))
    return sequences, spans, texts


def _generate_counting(model: Model, s, cap, sequences: list[list[int]], labels: range, scope: str,
                       max_new_tokens: int) -> bool:
    """Generates from one batch of prompts while the capture counts the generated tokens (all of
    them, or those between the think markers). Returns whether Ctrl-C stopped it."""
    opened: dict[int, int] = {}  # seq -> first position inside its thinking span
    closed: set[int] = set()
    if scope == "generated":
        for seq, label in enumerate(labels):
            cap.bind(seq, label, len(sequences[seq]))
    if scope == "thinking":  # a template may open the span in the prompt (DeepSeek-R1's "<think>\n")
        trackers = [model.think_markers.tracker(tokens) for tokens in sequences]
        for seq, tracker in enumerate(trackers):
            if tracker.inside:
                opened[seq] = len(sequences[seq])
                cap.bind(seq, labels[seq], opened[seq])

    def follow_markers(seq: int, token: int, pos: int) -> None:
        # counts the tokens strictly between the first opener and the first closer after it
        if seq in closed:
            return
        was_inside = trackers[seq].inside
        trackers[seq].feed(token)
        if trackers[seq].inside and not was_inside:
            opened[seq] = pos + 1
            cap.bind(seq, labels[seq], pos + 1)
        elif was_inside and not trackers[seq].inside:
            cap.bind(seq, labels[seq], opened[seq], pos)
            closed.add(seq)

    gens = s.generate_batch(sequences, max_tokens=max_new_tokens,
                            on_token=follow_markers if scope == "thinking" else None)
    return gens[0].interrupted


def capture_batch(batch_ctx: int, n_vocab: int) -> int:
    """Tokens per decode call while capturing: at most 2048, and few enough that llama.cpp's logits buffer stays
    within LOGITS_BUFFER_BYTES whatever the vocabulary."""
    return max(1, min(batch_ctx, 2048, max(64, LOGITS_BUFFER_BYTES // (4 * n_vocab))))


def capture_activations(model: Model, behavior: Sequence[Prompt], baseline: Sequence[Prompt], *,
                        scope: str = "prompt", chat: bool = True, batch_size: int = 32, max_new_tokens: int = 32,
                        n_ctx: int = 4096, show_progress: bool | None = None, n_threads: int | None = None,
                        output_norms: bool = False) -> CaptureRun:
    """Routing of every prompt, counted over the scope's tokens. Ctrl-C keeps what was captured. With
    output_norms the capture also sums gate weight x expert output norm (what the reap method reads).

    Up to batch_size prompts (fewer when long: MAX_BATCH_TOKENS) share one decode call; generated
    scopes make one decode call per generated token for the whole batch.
    A prompt (plus its generation) longer than n_ctx tokens is refused with an error naming it, and so is the
    thinking scope on a model whose vocabulary has no think markers (it would count nothing).
    """
    if scope not in SCOPES:
        raise MoteError(f"unknown scope {scope!r}: choose one of {', '.join(SCOPES)}")
    if scope == "thinking" and model.think_markers is None:
        raise MoteError(f"scope 'thinking' counts the tokens between <think> and </think> (or in gpt-oss's analysis "
                        f"channel), but {model.path.name} has no single tokens for those markers: it does not think "
                        "in marked spans; choose another scope (prompt, target, generated)")
    if not behavior or not baseline:
        raise MoteError("fTRI needs at least one behaviour prompt and one baseline prompt")
    layout = model.layout.require_moe()
    # interleaved, so that an interrupted run still has prompts of both classes
    order = sorted([(i, 0, p) for i, p in enumerate(behavior)] + [(i, 1, p) for i, p in enumerate(baseline)],
                   key=lambda t: (t[0], t[1]))
    prompts = [p for _, _, p in order]
    flags = np.array([cls == 0 for _, cls, _ in order])
    generating = scope in ("generated", "thinking")
    sequences, spans, texts = _sequences(model, prompts, scope, chat, n_ctx, max_new_tokens)
    counts = np.zeros((len(prompts), layout.n_layer, layout.n_expert), dtype=np.int64)
    weights = np.zeros(counts.shape, dtype=np.float64)
    norms = np.zeros(counts.shape, dtype=np.float64) if output_norms else None
    tokens = np.zeros((len(prompts), layout.n_layer), dtype=np.int64)
    done, partial = 0, False
    longest = max(len(q) for q in sequences) + (max_new_tokens if generating else 0)
    batch_size = max(1, min(batch_size, MAX_BATCH_TOKENS // longest))
    batch_ctx = batch_size * longest + 16
    # one KV cache for the whole batch: with a cache per sequence llama.cpp splits a batch of prompts
    # of unequal length into many small ubatches
    with progress_bar(len(prompts), f"fTRI capture ({scope} tokens)", "prompt", show_progress) as bar, \
            model.session(n_ctx=batch_ctx, n_seq_max=batch_size, n_batch=capture_batch(batch_ctx, model.n_vocab), kv_unified=True,
                          n_threads=n_threads) as s, \
            s.capture(label=None, output_norms=output_norms) as cap:
        try:
            for start in range(0, len(sequences), batch_size):
                batch = range(start, min(start + batch_size, len(sequences)))
                cap.unbind_all()
                if generating:
                    if _generate_counting(model, s, cap, [sequences[i] for i in batch], batch, scope, max_new_tokens):
                        partial = True
                        break
                else:
                    for seq, idx in enumerate(batch):
                        cap.bind(seq, idx, *spans[idx])
                    s.route([sequences[idx] for idx in batch], keep_logits=False)  # routing only
                done = batch.stop
                bar.update(len(batch))
        except KeyboardInterrupt:
            partial = True
        for label in cap.labels:
            st = cap.stats(label)
            counts[label], weights[label], tokens[label] = st.counts, st.weight_sums, st.tokens
            if output_norms:
                norms[label] = st.output_norm_sums
    keep = slice(0, done)
    if done == 0:
        raise MoteError("interrupted before any prompt was captured: nothing to score")
    if flags[keep].all() or not flags[keep].any():
        raise MoteError("interrupted before both classes had a captured prompt: nothing to score")
    act = Activations(counts=counts[keep], tokens=tokens[keep], weight_sums=weights[keep], is_behavior=flags[keep],
                      output_norm_sums=None if norms is None else norms[keep])
    return CaptureRun(act, prompts[:done], scope, partial, texts[:done])


def profile_from_ranking(ranked: Sequence[RankedExpert], model: Model, *, positive: str = "drop",
                         negative: str = "force", name: str = "ftri", metadata: dict | None = None):
    """Experts that fire more on the behaviour are switched off (positive mode), those that fire
    less are forced on (negative mode); an expert that scores 0 carries no evidence and is left out.
    :func:`export_profile` also asks for evidence (an interval that excludes 0) and keeps off super-experts."""
    entries = [Entry(r.layer, r.expert, Mode(positive if r.score > 0 else negative)) for r in ranked if r.score != 0]
    return Profile.from_entries(entries, model_path=model.path, name=name, metadata=metadata or {})


@dataclass
class Export:
    """The profile an fTRI result exports, and why it holds what it holds."""

    profile: Profile
    chosen: list[RankedExpert]                   # exported, in rank order
    n_qualified: int                             # experts with evidence for the sign, before any cap
    top: int                                     # the cap asked for
    skipped: list[tuple[RankedExpert, str]]      # qualified but left out, and why
    settings: dict

    def summary(self) -> str:
        """What a person reads after `mote ftri`: how many qualified, what was exported, what was left out."""
        s = self.settings
        what = {"positive": "more active on the behaviour", "negative": "less active on the behaviour",
                "abs": "active differently on the behaviour"}[s["sign"]]
        bound = "0" if not s["threshold"] else f"±{s['threshold']:g}"
        interval = "simultaneous 95% band" if s["evidence"] == "simultaneous" else "per-expert 95% interval"
        lines = [f"profile: {self.n_qualified} expert(s) {what} with evidence ({interval} beyond {bound}); "
                 f"exported {len(self.chosen)} (--top {self.top})"]
        if self.chosen:
            lines.append("  " + ", ".join(f"{e.mode.value} {e.layer}:{e.expert}"
                                           + (f"={e.value:+.3g}" if e.mode is Mode.BIAS else "")
                                           for e in self.profile.entries))
        elif s["n_boot"] < MIN_BOOT_EVIDENCE:
            lines.append(f"  no expert qualified: {s['n_boot']} bootstrap replicates are too few for evidence "
                         f"(--n-boot {MIN_BOOT_EVIDENCE} or more; 200 by default)")
        else:
            lines.append("  no expert qualified: the profile has no entries (more prompts narrow the intervals; "
                         "--evidence per-expert or a lower --threshold loosens the bar)")
        lines += [f"  left out {r.layer}:{r.expert}: {why}" for r, why in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**self.settings, "top": self.top, "n_qualified": self.n_qualified,
                "exported": [[r.layer, r.expert] for r in self.chosen],
                "skipped": [{"layer": r.layer, "expert": r.expert, "why": why} for r, why in self.skipped]}


def export_profile(result: FtriResult, model: Model, *, top: int = 10, sign: str = "positive",
                   threshold: float = 0.0, evidence: str = "simultaneous", per_layer_cap: int | None = None,
                   off_mode: str = "drop", force_positive: bool = False, graded: float | None = None,
                   log_ratio: np.ndarray | None = None, super_experts: Iterable[tuple[int, int]] = (),
                   include_super_experts: bool = False, name: str = "ftri", metadata: dict | None = None) -> Export:
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
        candidates, n_qualified = result.evidence(sign=sign, threshold=threshold, layers=layout.moe_layers,
                                                  evidence=evidence)
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
            skipped.append((r, "a flagged super-expert (mote inspect --super-experts); --include-super-experts "
                               "steers it anyway"))
            continue
        if per_layer_cap is not None and per_layer.get(r.layer, 0) >= per_layer_cap:
            skipped.append((r, f"layer {r.layer} already has --per-layer-cap {per_layer_cap} experts"))
            continue
        if graded is not None:
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
    settings = {"method": result.method, "n_boot": result.n_boot, "sign": sign, "threshold": float(threshold),
                "evidence": evidence,
                "off_mode": off_mode, "force_positive": bool(force_positive), "graded_alpha": graded,
                "per_layer_cap": per_layer_cap, "include_super_experts": bool(include_super_experts)}
    export = Export(Profile(), chosen, n_qualified, int(top), skipped, settings)
    return replace(export, profile=Profile.from_entries(entries, model_path=model.path, name=name,
                                                        metadata={**(metadata or {}), "export": export.to_dict()}))


def read_ranking(path: str | os.PathLike, moe_layers: Sequence[int], *, method: str | None = None,
                 exclude: Iterable[tuple[int, int]] = ()) -> dict:
    """The ranking an fTRI result gives, for a sweep: ``path`` is ftri.json or the folder that holds it, ``method``
    one of its methods (default: the first). Returns {"experts": [(layer, expert)] ordered by score (more active
    on the behaviour first; MoE layers only; ``exclude`` left out), "evidence": the ranked experts whose
    simultaneous band (per-expert interval for results older than the band) lies above 0, "left_out": the
    excluded ones that ranked, "method", "source"}."""
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
        raise MoteError(f"{p} has {result.scores.shape[0]} layers but the model routes in layers up to "
                        f"{max(moe_layers)}: was it made for another model?")
    ranked = [(r.layer, r.expert) for r in result.ranked(sign="positive", layers=moe_layers)]
    kind = "simultaneous" if result.se is not None else "per-expert"
    evidence = {(r.layer, r.expert) for r in result.evidence(sign="positive", layers=moe_layers, evidence=kind)[0]}
    excluded = {(int(l), int(e)) for l, e in exclude}
    return {"experts": [x for x in ranked if x not in excluded], "evidence": evidence,
            "left_out": [x for x in ranked if x in excluded], "method": method, "source": str(p)}


def ranking_table(result: FtriResult, ranked: Sequence[RankedExpert], truth: set[tuple[int, int]] = frozenset(),
                  *, threshold: float = 0.0, evidence: str = "simultaneous") -> str:
    """The ranking as a terminal table: score, per-expert 95% interval, rank stability, and whether the expert
    carries evidence for the result's sign (``qualified``, as the export asks)."""
    try:
        qualified = result.qualified(threshold=threshold, evidence=evidence)
    except ValueError:  # no band in an old result
        qualified = result.qualified(threshold=threshold, evidence="per-expert")
    lines = [f"{'rank':>4} {'layer':>5} {'expert':>6} {result.method:>12} {'95% CI':>19} {'stability':>9} "
             f"{'evidence':>8}" + ("  planted" if truth else "")]
    for i, r in enumerate(ranked, 1):
        mark = "  *" if (r.layer, r.expert) in truth else ""
        lines.append(f"{i:>4} {r.layer:>5} {r.expert:>6} {r.score:>12.4f} [{r.ci_low:>8.4f},{r.ci_high:>8.4f}]"
                     f" {r.stability:>9.2f} {'yes' if qualified[r.layer, r.expert] else '-':>8}{mark}")
    return "\n".join(lines)


def write_heatmap(path: Path, result: FtriResult, moe_layers: Sequence[int], top: Sequence[RankedExpert],
                  title: str) -> None:
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
    ax.set_xticks(range(data.shape[1]), [str(e) if data.shape[1] <= 64 or e % 8 == 0 else "" for e in range(data.shape[1])],
                  fontsize=7)
    fig.colorbar(im, ax=ax, label=f"{result.method} (behaviour − baseline)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def write_outputs(out: Path, run: CaptureRun, results: dict[str, FtriResult], model: Model, top: int,
                  per_layer_cap: int | None, profile) -> dict[str, Path]:
    """ftri.json, one CSV and one heatmap per method, profile.json; every file written atomically. ``profile``
    is a Profile or an :class:`Export` (whose record then goes into ftri.json too). Heatmaps box each method's
    top experts that carry evidence."""
    export = profile if isinstance(profile, Export) else None
    profile = export.profile if export else profile
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    summary = {
        "format": FTRI_FORMAT, "version": 1, "model": str(model.path), "arch": model.layout.arch,
        "scope": run.scope, "partial": run.partial, "n_behavior": int(run.activations.n_behavior),
        "n_baseline": int(run.activations.n_baseline), "moe_layers": list(model.layout.moe_layers),
        "results": {m: r.to_dict() for m, r in results.items()},
        "top": {m: [vars(x) for x in r.ranked(top, per_layer_cap=per_layer_cap, layers=model.layout.moe_layers)]
                for m, r in results.items()},
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
        w.writerow(["rank", "layer", "expert", "score", "ci_low", "ci_high", "band_low", "band_high", "stability",
                    "evidence"])
        for i, r in enumerate(ranked, 1):
            w.writerow([i, r.layer, r.expert, f"{r.score:.6g}", f"{r.ci_low:.6g}", f"{r.ci_high:.6g}",
                        f"{band_low[r.layer, r.expert]:.6g}", f"{band_high[r.layer, r.expert]:.6g}",
                        f"{r.stability:.4g}", int(qualified[r.layer, r.expert])])
        paths[f"csv_{method}"] = out / f"ftri_{method}.csv"
        atomic_write_text(paths[f"csv_{method}"], buf.getvalue())
        paths[f"png_{method}"] = out / f"heatmap_{method}.png"
        write_heatmap(paths[f"png_{method}"], result, model.layout.moe_layers,
                      result.evidence(top, per_layer_cap=per_layer_cap, layers=model.layout.moe_layers)[0],
                      f"fTRI {method}, {run.scope} tokens{', partial' if run.partial else ''}\n{model.path.name}")
    paths["profile"] = out / "profile.json"
    profile.save(paths["profile"])
    return paths


def run_ftri(model: Model, behavior: Sequence[Prompt], baseline: Sequence[Prompt], *, methods: Sequence[str],
             scope: str = "prompt", chat: bool = True, top: int = 10, n_boot: int = 200, seed: int = 0,
             batch_size: int = 32, max_new_tokens: int = 32, n_ctx: int = 4096, show_progress: bool | None = None,
             n_threads: int | None = None, sign: str = "positive") -> tuple[CaptureRun, dict[str, FtriResult]]:
    run = capture_activations(model, behavior, baseline, scope=scope, chat=chat, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, n_ctx=n_ctx, show_progress=show_progress,
                              n_threads=n_threads, output_norms=any(m in OUTPUT_METHODS for m in methods))
    results = {m: analyse(run.activations, m, n_boot=n_boot, top_n=top, sign=sign, seed=seed)
               for m in methods}
    return run, results
