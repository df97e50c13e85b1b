"""The frame every evaluation shares (:func:`~mote_local.evaluation.evaluate.evaluate`, the sweep): its settings,
prompts and neutral text, the plan of conditions, and the one generation path under them.

Every (condition, prompt) pair is one request of :func:`mote_local.engine.batch.generate_many`: pairs decode
together, ``n_parallel`` sequences at a time, each with its condition's steering, prompt by prompt so that the
conditions of one prompt run side by side and share its prefill where their steering allows (the unsteered run
and conditions whose steering is scoped to decode or thinking; steering scoped ``all`` or ``prefill`` changes the
prompt's cache, so that condition decodes its own). Responses are judged as they finish (a judge model many per
decode call), kept in the output folder as they come (:mod:`~mote_local.evaluation.checkpoint`, for
``resume``), and the capability cost runs several conditions per decode call (:mod:`~mote_local.evaluation.cost`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mote_local.engine.batch import Request, generate_many, kv_cache_bytes, stream_cells
from mote_local.engine.model import Model
from mote_local.errors import EvalError
from mote_local.evaluation.checkpoint import Checkpoint, record_key
from mote_local.evaluation.cost import capability_cost, n_ctx_train, resolve_text, text_chunks
from mote_local.evaluation.detectors import Detector, describe_detector, detect_many
from mote_local.evaluation.super_experts import cached_super_experts
from mote_local.progress import progress_bar
from mote_local.steering.entries import Entry
from mote_local.steering.profile import Profile, entry_to_json

__all__ = ["Frame", "Options", "Planned", "batch_shape"]

#: Mean KL(unsteered ‖ steered) on the neutral text, in nats, above which a condition counts as collapsed.
COLLAPSE_KL = 1.0
#: Perplexity on the neutral text, as a multiple of the unsteered one, above which a condition counts as collapsed.
COLLAPSE_PERPLEXITY_RATIO = 10.0
RATE_INTERVAL = "Wilson score, 95%; pooled random control: Wilson at the effective sample size (prompts as clusters)"
DELTA_INTERVAL = "paired by prompt: Bonett-Price adjusted Wald on the per-prompt differences, 95%"

DEFAULT_PARALLEL = 32  # sequences per batch unless memory or -c says fewer
MAX_PARALLEL = 256  # llama.cpp's LLAMA_MAX_SEQ
KV_BUDGET_BYTES = 2 * 2**30  # the default batch keeps its KV cache under this (and a quarter of free memory)


@dataclass
class Options:
    """The settings evaluate() and sweep() share (their keyword arguments).

    ``detector``: a :class:`~mote_local.evaluation.detectors.Detector` (default phrases when None), a
    :class:`~mote_local.evaluation.detectors.JudgeDetector`, or any callable ``response -> bool``.
    ``neutral_text``: the text itself (str), a file (a PathLike), or None for the packaged default.
    ``n_parallel``: sequences decoded together (None: from the context and memory); ``n_ctx``: the context's
    cells shared by them (None: what they need). ``out_dir`` keeps finished work (``resume`` continues it);
    ``announce`` receives one line about the batch before generation starts."""

    neutral_text: str | os.PathLike | None = None
    detector: Any = None
    n_random: int = 3
    seed: int = 0
    max_tokens: int = 32
    chat: bool = True
    temperature: float = 0.0
    measure_cost: bool = True
    chunk_tokens: int = 256
    max_neutral_tokens: int = 1024
    exclude_super_experts: bool = True
    collapse_kl: float = COLLAPSE_KL
    collapse_perplexity_ratio: float = COLLAPSE_PERPLEXITY_RATIO
    show_progress: bool | None = None
    n_parallel: int | None = None
    n_ctx: int | None = None
    out_dir: str | os.PathLike | None = None
    resume: bool = False
    announce: Callable[[str], None] | None = None

    def __post_init__(self):
        if self.n_random < 0 or self.max_tokens < 1 or self.chunk_tokens < 2:
            raise EvalError("n_random must be >= 0, max_tokens >= 1 and chunk_tokens >= 2")
        if self.n_parallel is not None and not 1 <= self.n_parallel <= MAX_PARALLEL:
            raise EvalError(f"n_parallel must be 1..{MAX_PARALLEL}, got {self.n_parallel}")
        if self.resume and self.out_dir is None:
            raise EvalError("resume continues the run kept in an output folder: give out_dir (--out)")


@dataclass
class Planned:
    """A condition to generate: its name, label, steering entries (none: unsteered) and random-control seed."""

    name: str
    label: str
    entries: list[Entry]
    seed: int | None = None


@dataclass
class Outcome:
    """What the generation path measured: per condition its generations (one record per finished prompt, in
    prompt order) and its capability cost (KL, perplexity); whether Ctrl-C cut it short; what was resumed."""

    generations: dict[str, list[dict[str, Any]]]
    costs: dict[str, tuple[float | None, float | None]]
    partial: bool
    resumed: dict[str, int] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)


def batch_shape(
    model: Model, need: int, n_pairs: int, n_parallel: int | None, n_ctx: int | None, min_ctx: int = 0
) -> tuple[int, int]:
    """(sequences per batch, context cells): each sequence holds a KV stream of its own, of ``need`` positions
    (and ``min_ctx``, what the capability cost's chunks need) rounded up to llama.cpp's 256; ``n_ctx`` (when
    given) bounds them all, as -c does in `mote serve`; the default batch is at most DEFAULT_PARALLEL sequences
    and keeps its KV cache under KV_BUDGET_BYTES and a quarter of the free memory."""
    if n_ctx is not None and n_ctx > 0 and need > n_ctx:
        raise EvalError(
            f"a prompt and its new tokens need {need} positions but the context holds {n_ctx}: raise "
            "-c/--ctx-size (or lower --max-tokens)"
        )
    cells = stream_cells(max(need, min_ctx))
    room = max(1, n_ctx // cells) if n_ctx else MAX_PARALLEL
    if n_parallel is None:
        budget = min(KV_BUDGET_BYTES, _free_memory() // 4)
        n_parallel = max(1, min(DEFAULT_PARALLEL, n_pairs, room, budget // max(1, kv_cache_bytes(model, cells))))
    elif n_ctx and n_parallel * cells > n_ctx:
        raise EvalError(
            f"-np {n_parallel} sequences of {need} positions need a context of {n_parallel * cells} "
            f"(each sequence's cache holds a multiple of 256), but -c is {n_ctx}: raise -c or lower -np"
        )
    return n_parallel, n_parallel * cells


def _free_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _prompt_text(prompt: Any) -> str:
    text = prompt.text if hasattr(prompt, "text") else prompt
    if not isinstance(text, str):
        raise EvalError(f"a prompt must be a string or have .text, got {prompt!r}")
    return text


def pair_seed(seed: int, condition: str, prompt: int) -> int:
    """The sampling seed of one (condition, prompt): the same whichever pairs it is batched with."""
    digest = hashlib.sha256(f"{seed}|{condition}|{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class Frame:
    """One evaluation's shared parts: the model, the options, the prompts' texts and tokens, the neutral
    chunks, the notes, and the generation path (:meth:`run`)."""

    def __init__(self, model: Model, prompts: Sequence[Any], options: Options):
        self.started = time.perf_counter()
        self.model = model
        self.layout = model.layout.require_moe()
        self.options = options
        self.texts = [_prompt_text(p) for p in prompts]
        if not self.texts:
            raise EvalError("no prompts to evaluate")
        self.prompt_tokens = [model.prompt_tokens(t, chat=options.chat) for t in self.texts]
        self.detector = Detector() if options.detector is None else options.detector
        self.notes: list[str] = []
        self.supers = cached_super_experts(model.path) or set()
        self.exclude = self.supers if options.exclude_super_experts else set()
        self.chunks: list[list[int]] = []
        self.neutral_source: str | None = None
        if options.measure_cost:
            body, self.neutral_source = resolve_text(options.neutral_text)
            n_train = n_ctx_train(model)
            size = min(options.chunk_tokens, n_train) if n_train >= 2 else options.chunk_tokens
            self.chunks = text_chunks(model, body, size, options.max_neutral_tokens)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def settings(self, outcome: Outcome, **extra: Any) -> dict[str, Any]:
        """The settings both reports show, then ``extra``; the notes last (the run's notes are final by then)."""
        o = self.options
        if outcome.partial:
            self.notes.append("interrupted: partial results (only finished generations are counted)")
        if not self.chunks:
            self.notes.append("capability cost not measured: a collapsed condition cannot be flagged")
        if outcome.resumed.get("generations") or outcome.resumed.get("costs"):
            self.notes.append(
                f"resumed from {o.out_dir}: {outcome.resumed['generations']} of "
                f"{outcome.resumed['pairs']} generations and {outcome.resumed['costs']} capability "
                "cost(s) came from an earlier run"
            )
        return {
            "n_prompts": len(self.texts),
            "prompts": self.texts,
            "n_random": o.n_random,
            "seed": o.seed,
            "max_tokens": o.max_tokens,
            "temperature": o.temperature,
            "decoding": "greedy"
            if o.temperature <= 0
            else f"sampled (temperature {o.temperature}, seeded per condition and prompt)",
            "chat": o.chat,
            "chat_template": bool(o.chat and self.model.chat_template),
            "detector": describe_detector(self.detector),
            "neutral_text": self.neutral_source,
            "neutral_tokens": sum(len(c) for c in self.chunks),
            "chunks": len(self.chunks),
            "chunk_tokens": max((len(c) for c in self.chunks), default=0),
            "rate_interval": RATE_INTERVAL,
            "delta_interval": DELTA_INTERVAL,
            "collapse": {"kl_nats": o.collapse_kl, "perplexity_ratio": o.collapse_perplexity_ratio},
            "random_excluded_super_experts": [list(x) for x in sorted(self.exclude)],
            "batch": outcome.batch,
            "resumed": outcome.resumed,
            **extra,
            "notes": self.notes,
        }

    # ---------------------------------------------------------------------------------------------- generation

    def _base_key(self) -> list[Any]:
        o = self.options
        fp = self.model.fingerprint
        return [
            dataclasses.asdict(fp) if dataclasses.is_dataclass(fp) else str(fp),
            self.layout.file_type,
            self.layout.size_bytes,
            o.max_tokens,
            o.temperature,
            o.seed,
        ]

    def run(self, plan: Sequence[Planned], strength: float, desc: str = "evaluating") -> Outcome:
        """Generates every prompt under every planned condition and measures each condition's capability cost.
        Steering the engine refuses fails before any generation; Ctrl-C keeps what was finished (the cost is
        then skipped), in the output folder too."""
        o = self.options
        store = Checkpoint(o.out_dir, o.resume) if o.out_dir is not None else None
        base = self._base_key()
        detector_id = describe_detector(self.detector)
        pairs, keys = [], []
        for i in range(len(self.texts)):  # prompt-major: the conditions of one prompt share its prefill
            for c in plan:
                pairs.append((c, i))
                keys.append(
                    record_key(
                        "generation",
                        base,
                        detector_id,
                        [entry_to_json(e) for e in c.entries],
                        strength if c.entries else None,
                        self.prompt_tokens[i],
                        pair_seed(o.seed, c.name, i) if o.temperature > 0 else None,
                    )
                )
        found = {j: store.get(k) for j, k in enumerate(keys)} if store is not None else {}
        todo = [j for j in range(len(pairs)) if found.get(j) is None]
        need = max(len(self.prompt_tokens[pairs[j][1]]) for j in todo) + o.max_tokens if todo else 2
        n_parallel, n_ctx = batch_shape(
            self.model, need, max(1, len(todo)), o.n_parallel, o.n_ctx, max((len(c) for c in self.chunks), default=0)
        )
        batch = {"n_parallel": n_parallel, "n_ctx": n_ctx, "kv_bytes": kv_cache_bytes(self.model, n_ctx)}
        if o.announce is not None:
            o.announce(
                f"{len(todo)} generations ({len(plan)} conditions x {len(self.texts)} prompts"
                + (f", {len(pairs) - len(todo)} resumed" if len(todo) < len(pairs) else "")
                + f"), {n_parallel} sequences per batch; KV cache {n_ctx} cells, "
                f"{batch['kv_bytes'] / 2**20:.1f} MiB"
            )
        generations: dict[str, list[dict[str, Any]]] = {c.name: [] for c in plan}
        for j, rec in found.items():
            if rec is not None:  # the prompt's place in this run (the key holds its tokens, not its place)
                generations[pairs[j][0].name].append(dict(rec, prompt=pairs[j][1]))
        profiles = {c.name: Profile(tuple(c.entries), strength) if c.entries else None for c in plan}
        partial = False
        costs: dict[str, tuple[float | None, float | None]] = {}
        resumed_costs = 0
        with self.model.session(n_ctx=n_ctx, n_batch=max(512, n_parallel), n_seq_max=n_parallel) as s:
            for p in profiles.values():  # fail on a refused steering before any generation
                if p is not None:
                    s.steer(p, seq_id=0)
            s.clear_steering()
            requests = [
                Request(
                    tuple(self.prompt_tokens[pairs[j][1]]),
                    o.max_tokens,
                    profiles[pairs[j][0].name],
                    temperature=o.temperature,
                    seed=pair_seed(o.seed, pairs[j][0].name, pairs[j][1]),
                )
                for j in todo
            ]
            try:
                self._generate(
                    s, requests, [pairs[j] for j in todo], [keys[j] for j in todo], generations, store, len(pairs), desc
                )
                todo_costs = {c.name: c for c in plan}
                cost_keys = {
                    c.name: record_key(
                        "cost",
                        base,
                        [entry_to_json(e) for e in c.entries],
                        strength if c.entries else None,
                        self.chunks,
                    )
                    for c in plan
                }
                if self.chunks:
                    for name in list(todo_costs):
                        rec = store.get(cost_keys[name]) if store is not None else None
                        if rec is not None:
                            costs[name] = (rec["kl"], rec["perplexity"])
                            del todo_costs[name]
                            resumed_costs += 1
                    measured = (
                        capability_cost(s, self.chunks, {n: (c.entries, strength) for n, c in todo_costs.items()})
                        if todo_costs
                        else {}
                    )
                    for name, value in measured.items():
                        costs[name] = value
                        if store is not None:
                            store.add(cost_keys[name], {"kl": value[0], "perplexity": value[1]})
            except KeyboardInterrupt:
                partial = True
                costs = {}
            finally:
                if store is not None:
                    store.flush()
        for gens in generations.values():
            gens.sort(key=lambda g: g["prompt"])
        resumed = {"pairs": len(pairs), "generations": len(pairs) - len(todo), "costs": resumed_costs}
        return Outcome(generations, costs, partial, resumed, batch)

    def _generate(
        self,
        session,
        requests: list[Request],
        pairs: list[tuple[Planned, int]],
        keys: list[str],
        generations: dict[str, list[dict[str, Any]]],
        store: Checkpoint | None,
        total: int,
        desc: str,
    ) -> None:
        detector = self.detector
        per_call = max(1, int(getattr(detector, "batch_size", 1)))
        pending: list[tuple[int, Any]] = []
        tokens, started = 0, time.perf_counter()
        with progress_bar(total, desc, "generation", self.options.show_progress) as bar:
            bar.update(total - len(requests))

            def judge(final: bool) -> None:
                nonlocal pending
                while pending and (final or len(pending) >= per_call):
                    chunk, pending = pending[:per_call], pending[per_call:]
                    hits = detect_many(
                        detector, [g.text for _, g in chunk], [self.texts[pairs[j][1]] for j, _ in chunk]
                    )
                    for (j, g), hit in zip(chunk, hits):
                        c, i = pairs[j]
                        rec = {"prompt": i, "text": g.text, "detected": bool(hit), "n_tokens": len(g.tokens)}
                        generations[c.name].append(rec)
                        if store is not None:
                            store.add(keys[j], rec)
                    bar.update(len(chunk))

            steps = generate_many(session, requests)
            try:
                for finished in steps:
                    for j, g in finished:
                        tokens += len(g.tokens)
                        pending.append((j, g))
                    judge(final=False)
                    if finished:
                        bar.set_postfix_str(
                            f"{tokens / max(1e-9, time.perf_counter() - started):.0f} tok/s", refresh=False
                        )
            finally:
                steps.close()  # frees the slots now, while the session is open, however the loop ended
            judge(final=True)
