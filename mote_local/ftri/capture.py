"""fTRI capture: the routing of every prompt of two classes, counted over a token scope, on the engine.

Capture puts many prompts in one decode call (one sequence each, bound to its own label), so a prompt set costs a
few batched decodes. What is scored and written lives beside it: ``stats`` (pure numpy), ``export`` (the profile a
result supports), ``outputs`` (ftri.json, CSVs, heatmaps, the terminal table, the typed ranking a sweep reads).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mote_local.engine.model import Model, open_model
from mote_local.engine.options import ModelOptions, require_fit
from mote_local.errors import MoteError
from mote_local.ftri.stats import OUTPUT_METHODS, Activations, FtriResult, analyse
from mote_local.progress import progress_bar
from mote_local.prompts import Prompt

SCOPES = ("prompt", "target", "generated", "thinking")
# Options for a Model loaded to capture routing on the CPU: llama.cpp's repacked quantized weights
# are slower for MoE expert matmuls and sit in memory beside the mapped file (bench/RESULTS.md:
# Q4_K_M capture 1.15-1.28x faster at 63% of the memory without them). open_capture_model applies them.
CAPTURE_MODEL_OPTIONS = {"use_extra_bufts": False}

# Tokens one batch's KV cache may hold: bounds the memory of batches of long prompts.
MAX_BATCH_TOKENS = 16384
# Every counted token must be an output (the last layer routes only outputs), so llama.cpp keeps n_batch x n_vocab
# logits per decode call even when none are copied out: tokens per call are capped to hold that buffer to this size
# (a 4k vocabulary keeps 2048 tokens per call; Qwen's 151,936 about 110).
LOGITS_BUFFER_BYTES = 64 * 2**20


def open_capture_model(path: str | os.PathLike, model_options: ModelOptions | None = None, **model_params) -> Model:
    """The model loaded with a command's options (engine.options) the way capture runs fastest
    (CAPTURE_MODEL_OPTIONS under the caller's own parameters)."""
    return open_model(path, model_options, **{**CAPTURE_MODEL_OPTIONS, **model_params})


@dataclass
class CaptureRun:
    activations: Activations
    prompts: list[Prompt]  # in capture order: the two classes interleaved
    scope: str
    partial: bool  # interrupted: only the prompts captured so far
    texts: list[str]  # what was fed to the model (after the chat template)


def _sequences(
    model: Model, prompts: Sequence[Prompt], scope: str, chat: bool, n_ctx: int, max_new_tokens: int
) -> tuple[list[list[int]], list[tuple[int, int]], list[str]]:
    """Token sequences to decode, the [begin, end) positions to count in each, and the texts fed.

    Generated scopes decode the prompts and count what the model generates from them (their spans
    are placeholders: the tokens are not known yet).
    """
    generating = scope in ("generated", "thinking")
    sequences: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    texts: list[str] = []
    for p in prompts:
        text = model.prompt_text(p.text, chat=chat)
        toks = model.prompt_tokens(p.text, chat=chat)
        require_fit(
            len(toks) + (max_new_tokens if generating else 0),
            n_ctx,
            f"the prompt {p.describe()}{' with its generation' if generating else ''}",
        )
        texts.append(text)
        if scope == "target":
            if p.response is None:
                raise MoteError(
                    f"scope 'target' needs a paired response for every prompt; {p.text!r} (class {p.cls}) has none"
                )
            resp = model.tokenize(p.response, add_bos=False)
            sequences.append(toks + resp)
            spans.append((len(toks), len(toks) + len(resp)))
        else:
            sequences.append(toks)
            spans.append((0, len(toks)) if scope == "prompt" else (len(toks), -1))
    return sequences, spans, texts


def _generate_counting(
    model: Model, s, cap, sequences: list[list[int]], labels: range, scope: str, max_new_tokens: int
) -> bool:
    """Generates from one batch of prompts while the capture counts the generated tokens (all of
    them, or those between the think markers). Returns whether Ctrl-C stopped it."""
    opened: dict[int, int] = {}  # seq -> first position inside its thinking span
    closed: set[int] = set()
    if scope == "generated":
        for seq, label in enumerate(labels):
            cap.bind(seq, label, len(sequences[seq]))
    markers = model.think_markers  # capture_activations refused the thinking scope without them
    if scope == "thinking" and markers is not None:  # the template may open the span (DeepSeek-R1's "<think>\n")
        trackers = [markers.tracker(tokens) for tokens in sequences]
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

    gens = s.generate_batch(
        sequences, max_tokens=max_new_tokens, on_token=follow_markers if scope == "thinking" else None
    )
    return gens[0].interrupted


def capture_batch(batch_ctx: int, n_vocab: int) -> int:
    """Tokens per decode call while capturing: at most 2048, and few enough that llama.cpp's logits buffer stays
    within LOGITS_BUFFER_BYTES whatever the vocabulary."""
    return max(1, min(batch_ctx, 2048, max(64, LOGITS_BUFFER_BYTES // (4 * n_vocab))))


def capture_activations(
    model: Model,
    behavior: Sequence[Prompt],
    baseline: Sequence[Prompt],
    *,
    scope: str = "prompt",
    chat: bool = True,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    n_ctx: int = 4096,
    show_progress: bool | None = None,
    n_threads: int | None = None,
    output_norms: bool = False,
) -> CaptureRun:
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
        raise MoteError(
            f"scope 'thinking' counts the tokens between <think> and </think> (or in gpt-oss's analysis "
            f"channel), but {model.path.name} has no single tokens for those markers: it does not think "
            "in marked spans; choose another scope (prompt, target, generated)"
        )
    if not behavior or not baseline:
        raise MoteError("fTRI needs at least one behaviour prompt and one baseline prompt")
    layout = model.layout.require_moe()
    # interleaved, so that an interrupted run still has prompts of both classes
    order = sorted(
        [(i, 0, p) for i, p in enumerate(behavior)] + [(i, 1, p) for i, p in enumerate(baseline)],
        key=lambda t: (t[0], t[1]),
    )
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
    with (
        progress_bar(len(prompts), f"fTRI capture ({scope} tokens)", "prompt", show_progress) as bar,
        model.session(
            n_ctx=batch_ctx,
            n_seq_max=batch_size,
            n_batch=capture_batch(batch_ctx, model.n_vocab),
            kv_unified=True,
            n_threads=n_threads,
        ) as s,
        s.capture(label=None, output_norms=output_norms) as cap,
    ):
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
            if norms is not None:
                norms[label] = st.output_norm_sums
    keep = slice(0, done)
    if done == 0:
        raise MoteError("interrupted before any prompt was captured: nothing to score")
    if flags[keep].all() or not flags[keep].any():
        raise MoteError("interrupted before both classes had a captured prompt: nothing to score")
    act = Activations(
        counts=counts[keep],
        tokens=tokens[keep],
        weight_sums=weights[keep],
        is_behavior=flags[keep],
        output_norm_sums=None if norms is None else norms[keep],
    )
    return CaptureRun(act, prompts[:done], scope, partial, texts[:done])


def run_ftri(
    model: Model,
    behavior: Sequence[Prompt],
    baseline: Sequence[Prompt],
    *,
    methods: Sequence[str],
    scope: str = "prompt",
    chat: bool = True,
    top: int = 10,
    n_boot: int = 200,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    n_ctx: int = 4096,
    show_progress: bool | None = None,
    n_threads: int | None = None,
    sign: str = "positive",
) -> tuple[CaptureRun, dict[str, FtriResult]]:
    run = capture_activations(
        model,
        behavior,
        baseline,
        scope=scope,
        chat=chat,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        n_ctx=n_ctx,
        show_progress=show_progress,
        n_threads=n_threads,
        output_norms=any(m in OUTPUT_METHODS for m in methods),
    )
    results = {m: analyse(run.activations, m, n_boot=n_boot, top_n=top, sign=sign, seed=seed) for m in methods}
    return run, results
