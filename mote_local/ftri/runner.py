"""fTRI runs: capture routing per prompt on the engine, score it, and write what a person reads.

Capture puts many prompts in one decode call (one sequence each, bound to its own label), so a
prompt set costs a few batched decodes; the statistics live in ftri_stats (pure numpy).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mote_local.atomic import atomic_path, atomic_write_text
from mote_local.engine.model import Model
from mote_local.errors import MoteError
from mote_local.ftri.stats import Activations, FtriResult, RankedExpert, analyse
from mote_local.progress import progress_bar
from mote_local.prompts import Prompt
from mote_local.steering.entries import Entry, Mode

SCOPES = ("prompt", "target", "generated", "thinking")
FTRI_FORMAT = "mote-ftri"  # the "format" of ftri.json

# Options for a Model loaded to capture routing on the CPU: llama.cpp's repacked quantized weights
# are slower for MoE expert matmuls and sit in memory beside the mapped file (bench/RESULTS.md:
# Q4_K_M capture 1.15-1.28x faster at 63% of the memory without them).
CAPTURE_MODEL_OPTIONS = {"use_extra_bufts": False}

# Tokens one batch's KV cache may hold: bounds the memory of batches of long prompts.
MAX_BATCH_TOKENS = 16384


@dataclass
class CaptureRun:
    activations: Activations
    prompts: list[Prompt]        # in capture order: the two classes interleaved
    scope: str
    partial: bool                # interrupted: only the prompts captured so far
    texts: list[str]             # what was fed to the model (after the chat template)


def _prompt_text(model: Model, prompt: Prompt, chat: bool) -> str:
    """The text the model is given for a prompt (recorded; the tokens come from model.prompt_tokens)."""
    return model.format_chat([{"role": "user", "content": prompt.text}]) if chat else prompt.text


def _sequences(model: Model, prompts: Sequence[Prompt], scope: str, chat: bool, n_ctx: int, max_new_tokens: int
               ) -> tuple[list[list[int]], list[tuple[int, int]], list[str]]:
    """Token sequences to decode, the [begin, end) positions to count in each, and the texts fed.

    Generated scopes decode the prompts and count what the model generates from them (their spans
    are placeholders: the tokens are not known yet).
    """
    generating = scope in ("generated", "thinking")
    sequences, spans, texts = [], [], []
    for p in prompts:
        text = _prompt_text(model, p, chat)
        toks = model.prompt_tokens(p.text, chat=chat)
        if len(toks) + (max_new_tokens if generating else 0) > n_ctx:
            raise MoteError(f"prompt {len(texts) + 1} ({p.cls}: {p.text[:40]!r}…) needs "
                            f"{len(toks)} tokens{' plus the generation' if generating else ''}, more than "
                            f"the context of {n_ctx}: shorten it or raise --ctx-size")
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


def capture_activations(model: Model, behavior: Sequence[Prompt], baseline: Sequence[Prompt], *,
                        scope: str = "prompt", chat: bool = True, batch_size: int = 32, max_new_tokens: int = 32,
                        n_ctx: int = 4096, show_progress: bool | None = None, n_threads: int | None = None
                        ) -> CaptureRun:
    """Routing of every prompt, counted over the scope's tokens. Ctrl-C keeps what was captured.

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
    tokens = np.zeros((len(prompts), layout.n_layer), dtype=np.int64)
    done, partial = 0, False
    longest = max(len(q) for q in sequences) + (max_new_tokens if generating else 0)
    batch_size = max(1, min(batch_size, MAX_BATCH_TOKENS // longest))
    batch_ctx = batch_size * longest + 16
    # one KV cache for the whole batch: with a cache per sequence llama.cpp splits a batch of prompts
    # of unequal length into many small ubatches
    with progress_bar(len(prompts), f"fTRI capture ({scope} tokens)", "prompt", show_progress) as bar, \
            model.session(n_ctx=batch_ctx, n_seq_max=batch_size, n_batch=min(batch_ctx, 2048), kv_unified=True,
                          n_threads=n_threads) as s, \
            s.capture(label=None) as cap:
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
                    s.route([sequences[idx] for idx in batch])
                done = batch.stop
                bar.update(len(batch))
        except KeyboardInterrupt:
            partial = True
        for label in cap.labels:
            st = cap.stats(label)
            counts[label], weights[label], tokens[label] = st.counts, st.weight_sums, st.tokens
    keep = slice(0, done)
    if done == 0:
        raise MoteError("interrupted before any prompt was captured: nothing to score")
    if flags[keep].all() or not flags[keep].any():
        raise MoteError("interrupted before both classes had a captured prompt: nothing to score")
    act = Activations(counts=counts[keep], tokens=tokens[keep], weight_sums=weights[keep], is_behavior=flags[keep])
    return CaptureRun(act, prompts[:done], scope, partial, texts[:done])


def profile_from_ranking(ranked: Sequence[RankedExpert], model: Model, *, positive: str = "drop",
                         negative: str = "force", name: str = "ftri", metadata: dict | None = None):
    """Experts that fire more on the behaviour are switched off (positive mode), those that fire
    less are forced on (negative mode)."""
    from mote_local.steering.profile import Profile

    entries = []
    for r in ranked:
        mode = Mode(positive if r.score > 0 else negative)
        entries.append(Entry(r.layer, r.expert, mode))
    return Profile.from_entries(entries, model_path=model.path, name=name, metadata=metadata or {})


def ranking_table(result: FtriResult, ranked: Sequence[RankedExpert], truth: set[tuple[int, int]] = frozenset()) -> str:
    lines = [f"{'rank':>4} {'layer':>5} {'expert':>6} {result.method:>12} {'95% CI':>19} {'stability':>9}"
             + ("  planted" if truth else "")]
    for i, r in enumerate(ranked, 1):
        mark = "  *" if (r.layer, r.expert) in truth else ""
        lines.append(f"{i:>4} {r.layer:>5} {r.expert:>6} {r.score:>12.4f} [{r.ci_low:>8.4f},{r.ci_high:>8.4f}]"
                     f" {r.stability:>9.2f}{mark}")
    return "\n".join(lines)


def write_heatmap(path: Path, result: FtriResult, moe_layers: Sequence[int], top: Sequence[RankedExpert],
                  title: str) -> None:
    """Layer × expert heatmap of the scores, diverging colours around 0, the top experts boxed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    data = result.scores[list(moe_layers)]
    limit = float(np.abs(data).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(6, data.shape[1] * 0.25 + 2), max(3, len(moe_layers) * 0.35 + 1.5)))
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
    plt.close(fig)


def write_outputs(out: Path, run: CaptureRun, results: dict[str, FtriResult], model: Model, top: int,
                  per_layer_cap: int | None, profile) -> dict[str, Path]:
    """ftri.json, one CSV and one heatmap per method, profile.json; every file written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    summary = {
        "format": FTRI_FORMAT, "version": 1, "model": str(model.path), "arch": model.layout.arch,
        "scope": run.scope, "partial": run.partial, "n_behavior": int(run.activations.n_behavior),
        "n_baseline": int(run.activations.n_baseline), "moe_layers": list(model.layout.moe_layers),
        "results": {m: r.to_dict() for m, r in results.items()},
        "top": {m: [vars(x) for x in r.ranked(top, per_layer_cap=per_layer_cap, layers=model.layout.moe_layers)]
                for m, r in results.items()},
    }
    paths["json"] = out / "ftri.json"
    atomic_write_text(paths["json"], json.dumps(summary, indent=1))
    for method, result in results.items():
        ranked = result.ranked(layers=model.layout.moe_layers)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["rank", "layer", "expert", "score", "ci_low", "ci_high", "stability"])
        for i, r in enumerate(ranked, 1):
            w.writerow([i, r.layer, r.expert, f"{r.score:.6g}", f"{r.ci_low:.6g}", f"{r.ci_high:.6g}",
                        f"{r.stability:.4g}"])
        paths[f"csv_{method}"] = out / f"ftri_{method}.csv"
        atomic_write_text(paths[f"csv_{method}"], buf.getvalue())
        paths[f"png_{method}"] = out / f"heatmap_{method}.png"
        write_heatmap(paths[f"png_{method}"], result, model.layout.moe_layers,
                      result.ranked(top, per_layer_cap=per_layer_cap, layers=model.layout.moe_layers),
                      f"fTRI {method}, {run.scope} tokens{', partial' if run.partial else ''}\n{model.path.name}")
    paths["profile"] = out / "profile.json"
    profile.save(paths["profile"])
    return paths


def run_ftri(model: Model, behavior: Sequence[Prompt], baseline: Sequence[Prompt], *, methods: Sequence[str],
             scope: str = "prompt", chat: bool = True, top: int = 10, n_boot: int = 200, seed: int = 0,
             batch_size: int = 32, max_new_tokens: int = 32, n_ctx: int = 4096, show_progress: bool | None = None,
             n_threads: int | None = None) -> tuple[CaptureRun, dict[str, FtriResult]]:
    run = capture_activations(model, behavior, baseline, scope=scope, chat=chat, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, n_ctx=n_ctx, show_progress=show_progress,
                              n_threads=n_threads)
    results = {m: analyse(run.activations, m, n_boot=n_boot, top_n=top, sign="positive", seed=seed)
               for m in methods}
    return run, results
