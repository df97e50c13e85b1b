"""Loading a MoE GGUF, steering its experts, capturing its routing, generating text.

    model = Model("model.gguf", n_gpu_layers=99)
    with model.session(n_ctx=1024) as s:
        s.steer([Entry(3, 17, Mode.MASK)])
        print(s.generate("What happened?").text)
        with s.capture() as cap:
            s.logits(model.tokenize("Hello there"))
        print(cap.stats().counts)

A Session is one llama.cpp context: steering and capture belong to it, so two sessions on one
model steer independently. Loading, tokenizing and sampling are llama-cpp-python's, through the
private copy of its bindings that the build vendors (mote_local_engine.llama_cpp).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from mote_local.engine import binding
from mote_local.engine.binding import llama, llama_chat_format, llama_internals
from mote_local.errors import (
    CaptureError,
    EngineError,
    InputError,
    ModelFileError,
    SteeringError,
)
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import MoeLayout, read_layout
from mote_local.steering.entries import Entry, Scope
from mote_local.steering.profile import Profile, ProfileMismatchError

# the phases a generation passes through; "all" entries apply in each
PHASES = (Scope.PREFILL, Scope.DECODE, Scope.THINKING)

# llama.cpp's llama_flash_attn_type
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


def _apply_params(params, options: dict, what: str) -> None:
    known = {name for name, _ in params._fields_}
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"unknown {what} option {name!r}; llama.cpp's options are: {', '.join(sorted(known))}")
        setattr(params, name, value)


class Model:
    """A GGUF model loaded by the patched engine. Close it (or use `with`) to free its memory."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, verbose: bool = False, **model_params):
        self.layout: MoeLayout = read_layout(path)  # a clear error for a bad file, before llama.cpp sees it
        self.path = self.layout.path
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        _apply_params(params, model_params, "model")
        self.verbose = verbose
        binding.set_verbose(verbose)  # llama.cpp's log is process-wide: the last model loaded decides
        try:
            self._model = llama_internals.LlamaModel(path_model=str(self.path), params=params, verbose=verbose)
        except ValueError as err:
            raise ModelFileError(f"llama.cpp could not load {self.path}: {err} "
                                 "(run with verbose=True to see llama.cpp's reason)") from None
        self.router = binding.router_info(self._model.model)
        self.n_vocab = self._model.n_vocab()

    # lifetime
    def close(self) -> None:
        self._model.close()  # closes the sessions' contexts first (registered on the model)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # vocabulary
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos, special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return self._model.detokenize(list(tokens), special).decode("utf-8", errors="replace")

    @functools.cached_property
    def fingerprint(self) -> Fingerprint:
        """What a profile made for this model records (computed once)."""
        return Fingerprint.of_layout(self.layout)

    @property
    def bos_token(self) -> int:
        return llama.llama_vocab_bos(self._model.vocab)

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._model.vocab, token))

    @property
    def metadata(self) -> dict[str, str]:
        return self._model.metadata()

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def format_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The conversation in the model's own chat template, ready for the assistant's turn.

        A model without a template gets the messages' plain text, one per line.
        """
        template = self.chat_template
        if not template:
            return "\n".join(m["content"] for m in messages) + "\n"
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=self._token_text(llama.llama_vocab_eos(self._model.vocab)),
            bos_token=self._token_text(self.bos_token), add_generation_prompt=True)
        return formatter(messages=list(messages)).prompt

    def _token_text(self, token: int) -> str:
        return self._model.token_get_text(token) if token >= 0 else ""

    @property
    def think_markers(self) -> tuple[int | None, int | None]:
        """Token ids of <think> and </think> when the vocabulary has them as single tokens."""
        def single(text: str) -> int | None:
            ids = self.tokenize(text, add_bos=False, special=True)
            return ids[0] if len(ids) == 1 else None
        return single("<think>"), single("</think>")

    def session(self, **ctx_params) -> "Session":
        return Session(self, **ctx_params)

    def check_entries(self, entries: Iterable[Entry]) -> list[Entry]:
        """Entries validated against this model's layout (the engine checks the rest)."""
        layout = self.layout.require_moe()
        checked = []
        for e in entries:
            if not isinstance(e, Entry):
                raise SteeringError(f"expected a steering Entry, got {e!r}")
            if e.layer not in layout.moe_layers:
                raise SteeringError(f"layer {e.layer} is not an MoE layer of {layout.path.name}: its MoE layers are "
                                    f"{_ranges(layout.moe_layers)}")
            if not 0 <= e.expert < layout.n_expert:
                raise SteeringError(f"expert {e.expert} is out of range: {layout.path.name} has experts "
                                    f"0..{layout.n_expert - 1} per layer")
            checked.append(e)
        return checked


def _ranges(values: Sequence[int]) -> str:
    return f"{values[0]}..{values[-1]}" if list(values) == list(range(values[0], values[-1] + 1)) else str(list(values))


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    interrupted: bool = False


@dataclass
class RoutingStats:
    """Routing accumulated for one label: per (layer, expert) selections and weight sums."""

    counts: np.ndarray             # int64 [n_layer, n_expert]
    weight_sums: np.ndarray        # float64 [n_layer, n_expert]
    prob_sums: np.ndarray | None   # float64 [n_layer, n_expert], with probs=True
    tokens: np.ndarray             # int64 [n_layer]: tokens counted in each layer
    moe_layers: tuple[int, ...]


@dataclass
class RoutingTrace:
    """One row per (token, MoE layer) counted."""

    label: np.ndarray
    seq_id: np.ndarray
    pos: np.ndarray
    layer: np.ndarray
    ids: np.ndarray                # [rows, n_expert_used]
    weights: np.ndarray            # [rows, n_expert_used]
    probs: np.ndarray | None       # [rows, n_expert]


class Capture:
    """Routing capture on a session; results stay readable after the `with` block ends."""

    def __init__(self, session: "Session", probs: bool, trace: bool):
        self._session = session
        self.probs = probs
        self.trace_enabled = trace
        self.active = False
        self._stats: dict[int, RoutingStats] = {}
        self._trace: RoutingTrace | None = None

    def bind(self, seq_id: int, label: int, pos_begin: int = 0, pos_end: int | None = None) -> None:
        """Counts tokens of sequence seq_id at positions [pos_begin, pos_end) under label."""
        self._require_active()
        err = binding.capture_bind(self._session._ctx_ptr, seq_id, label, pos_begin, -1 if pos_end is None else pos_end)
        if err:
            raise CaptureError(err)

    def unbind_all(self) -> None:
        self._require_active()
        binding.capture_unbind_all(self._session._ctx_ptr)

    def reset(self) -> None:
        """Forgets what was counted so far; bindings stay."""
        self._require_active()
        binding.capture_reset(self._session._ctx_ptr)

    @property
    def labels(self) -> list[int]:
        return binding.capture_labels(self._session._ctx_ptr) if self.active else sorted(self._stats)

    def stats(self, label: int = 0) -> RoutingStats:
        if not self.active:
            if label not in self._stats:
                raise CaptureError(f"no routing was captured for label {label}")
            return self._stats[label]
        layout = self._session.model.layout
        try:
            counts, weights, probs, tokens = binding.capture_read(
                self._session._ctx_ptr, label, layout.n_layer, layout.n_expert, self.probs)
        except KeyError as err:
            raise CaptureError(str(err.args[0])) from None
        return RoutingStats(counts, weights, probs, tokens, layout.moe_layers)

    def trace(self) -> RoutingTrace:
        if not self.trace_enabled:
            raise CaptureError("this capture keeps no trace: start it with trace=True")
        if not self.active:
            assert self._trace is not None
            return self._trace
        layout = self._session.model.layout
        meta, ids, weights, probs = binding.capture_trace(
            self._session._ctx_ptr, layout.n_expert_used, layout.n_expert, self.probs)
        return RoutingTrace(meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], ids, weights, probs)

    def _require_active(self) -> None:
        if not self.active:
            raise CaptureError("this capture has ended: start a new one with session.capture()")

    def _finish(self) -> None:
        """Snapshots the results, then stops the engine's capture."""
        self._stats = {label: self.stats(label) for label in self.labels}
        self._trace = self.trace() if self.trace_enabled else None
        self.active = False
        binding.capture_stop(self._session._ctx_ptr)


class Session:
    """One llama.cpp context on a model, with its own steering and routing capture."""

    def __init__(self, model: Model, *, n_ctx: int = 512, n_batch: int = 512, n_ubatch: int | None = None,
                 n_seq_max: int = 1, n_threads: int | None = None, flash_attn: str = "auto", **ctx_params):
        if flash_attn not in FLASH_ATTN:
            raise InputError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
        self.model = model
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch or min(n_batch, 512)
        params.n_seq_max = n_seq_max
        threads = n_threads or max(1, os.cpu_count() or 1)
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.no_perf = True
        _apply_params(params, ctx_params, "context")
        try:
            self._ctx = llama_internals.LlamaContext(model=model._model, params=params, verbose=model.verbose)
        except ValueError as err:
            raise EngineError(f"llama.cpp could not create a context ({err}); try a smaller n_ctx") from None
        self._ctx_ptr = self._ctx.ctx
        # llama.cpp may adjust what was asked for (e.g. n_batch is capped by n_ctx)
        self.n_ctx = self._ctx.n_ctx()
        self.n_batch = llama.llama_n_batch(self._ctx_ptr)
        self.n_seq_max = llama.llama_n_seq_max(self._ctx_ptr)
        self._profile = Profile()
        self._phase = Scope.PREFILL
        self._applied: tuple[Entry, ...] | None = ()
        self._capture: Capture | None = None

    def close(self) -> None:
        if self._capture is not None and self._capture.active:
            self._capture._finish()
        self._ctx.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # steering
    def steer(self, steering: Profile | Iterable[Entry], strength: float | None = None, *,
              force: bool = False) -> None:
        """Replaces this session's steering; on error the previous steering stays in place.

        Takes a Profile or entries (with `strength`, default 1). Entries scoped to a phase
        (prefill, decode, thinking) are switched on and off between decode calls. A profile made
        for another model (its fingerprint differs) is refused unless `force`.
        """
        profile = steering if isinstance(steering, Profile) else Profile(tuple(steering))
        if profile.fingerprint is not None and not force:
            problem = profile.fingerprint.mismatch(self.model.fingerprint)
            if problem:
                raise ProfileMismatchError(f"the profile does not fit {self.model.path.name}: {problem}; "
                                           "pass force=True to apply it anyway")
        if strength is not None:
            profile = Profile(profile.entries, float(strength), profile.fingerprint, profile.name)
        self.model.check_entries(profile.entries)
        for phase in PHASES:  # validate every phase's set now, so that a later switch cannot fail
            err = binding.steer_set(self._ctx_ptr, [e.native() for e in profile.for_scope(phase)], profile.strength)
            if err:
                self._applied = None
                self._set_phase(self._phase)  # restore what was in effect
                raise SteeringError(err)
        self._profile = profile
        self._applied = None
        self._set_phase(self._phase)

    def clear_steering(self) -> None:
        binding.steer_clear(self._ctx_ptr)
        self._profile, self._applied = Profile(), ()

    def _set_phase(self, phase: Scope) -> None:
        """Puts the entries that apply in `phase` into the engine (a no-op when they are unchanged)."""
        self._phase = phase
        active = self._profile.for_scope(phase)
        if active == self._applied:
            return
        err = binding.steer_set(self._ctx_ptr, [e.native() for e in active], self._profile.strength)
        if err:  # validated in steer(); reaching this is a bug
            raise SteeringError(err)
        self._applied = active

    @property
    def steering(self) -> Profile:
        return self._profile

    # capture
    @contextlib.contextmanager
    def capture(self, *, probs: bool = False, trace: bool = False, label: int | None = 0) -> Iterator[Capture]:
        """Captures routing inside the block. Sequence 0 counts under `label` unless label is None."""
        if self._capture is not None and self._capture.active:
            raise CaptureError("a capture is already running on this session")
        self.model.layout.require_moe()
        flags = (binding.CAPTURE_PROBS if probs else 0) | (binding.CAPTURE_TRACE if trace else 0)
        err = binding.capture_start(self._ctx_ptr, flags)
        if err:
            raise CaptureError(err)
        cap = self._capture = Capture(self, probs, trace)
        cap.active = True
        try:
            if label is not None:
                cap.bind(0, label)
            yield cap
        finally:
            if cap.active:
                cap._finish()

    @property
    def capturing(self) -> bool:
        return self._capture is not None and self._capture.active

    # evaluation
    def reset(self) -> None:
        """Forgets the context's memory (KV cache) of all sequences."""
        llama.llama_memory_clear(self._ctx.memory, True)

    def decode(self, sequences: Sequence[tuple[int, Sequence[int], int]], *, outputs: str = "all") -> np.ndarray:
        """Decodes (seq_id, tokens, first position) sequences together, in chunks of n_batch tokens.

        outputs="all" returns logits for every token (and routes every token in every layer, which
        capture needs, so it is forced while capturing); "last" only for each sequence's last token.
        Returns [n_outputs, n_vocab].
        """
        if self.capturing:
            outputs = "all"  # the last layer routes only output tokens: every counted token must be one
        flat: list[tuple[int, int, int, bool]] = []  # (token, pos, seq_id, output)
        for seq_id, tokens, pos0 in sequences:
            if not 0 <= seq_id < self.n_seq_max:
                raise InputError(f"sequence id {seq_id} is out of range: this session has n_seq_max={self.n_seq_max}")
            if pos0 + len(tokens) > self.n_ctx:
                raise InputError(f"sequence {seq_id} needs {pos0 + len(tokens)} positions but the context holds "
                                 f"{self.n_ctx}: raise n_ctx or shorten the prompt")
            for i, t in enumerate(tokens):
                if not 0 <= int(t) < self.model.n_vocab:
                    raise InputError(f"token id {t} is out of range for a vocabulary of {self.model.n_vocab}")
                flat.append((int(t), pos0 + i, seq_id, outputs == "all" or i == len(tokens) - 1))
        if not flat:
            raise InputError("nothing to decode: no tokens given")
        logits = []
        batch = llama_internals.LlamaBatch(n_tokens=min(len(flat), self.n_batch), embd=0,
                                           n_seq_max=self.n_seq_max, verbose=False)
        try:
            for start in range(0, len(flat), self.n_batch):
                chunk = flat[start:start + self.n_batch]
                b = batch.batch
                b.n_tokens = len(chunk)
                for j, (tok, pos, seq_id, out) in enumerate(chunk):
                    b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, out
                    b.seq_id[j][0] = seq_id
                rc = llama.llama_decode(self._ctx_ptr, b)
                if rc != 0:
                    raise EngineError(f"llama_decode failed (code {rc}); "
                                      "see llama.cpp's log with verbose=True")
                n_out = sum(1 for c in chunk if c[3])
                if n_out:
                    ptr = llama.llama_get_logits(self._ctx_ptr)
                    logits.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.model.n_vocab)).copy())
        finally:
            batch.close()
        return np.concatenate(logits) if logits else np.zeros((0, self.model.n_vocab), dtype=np.float32)

    def _check_sequence_count(self, n: int) -> None:
        if n > self.n_seq_max:
            raise InputError(f"{n} sequences but this session has n_seq_max={self.n_seq_max}: "
                             "open the session with a larger n_seq_max")

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits [len(tokens), n_vocab] for every position of one fresh sequence (prefill)."""
        self._set_phase(Scope.PREFILL)
        self.reset()
        return self.decode([(0, tokens, 0)])

    def route(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Decodes several fresh sequences (ids 0..n-1) in one batch, every token an output."""
        self._check_sequence_count(len(sequences))
        self._set_phase(Scope.PREFILL)
        self.reset()
        return self.decode([(i, seq, 0) for i, seq in enumerate(sequences)])

    def generate_batch(self, prompts: Sequence[Sequence[int]], *, max_tokens: int = 32,
                       on_token: Callable[[int, int, int], None] | None = None) -> list[Generation]:
        """Greedy continuations of several fresh sequences (ids 0..n-1) decoded together: one decode
        call per step for every sequence still generating.

        on_token(seq_id, token, pos) is called for each generated token before it is decoded (so a
        capture binding changed there applies to that token). Every generated token is decoded, as
        in generate(). Several sequences in one batch change llama.cpp's float accumulation order, so
        a continuation may part from generate()'s where two logits nearly tie. Decode-scoped steering
        applies while generating; thinking-scoped entries are not switched per sequence. Ctrl-C
        returns what was generated so far, each Generation marked interrupted.
        """
        prompts = [list(p) for p in prompts]
        if not prompts or not all(prompts):
            raise InputError("generate_batch needs one or more non-empty prompts")
        self._check_sequence_count(len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        pos = [len(p) for p in prompts]
        interrupted = False
        try:
            self._set_phase(Scope.PREFILL)
            self.reset()
            logits = self.decode([(i, p, 0) for i, p in enumerate(prompts)], outputs="last")
            if len(logits) != len(prompts):  # capture made every token an output: keep each last row
                logits = logits[np.cumsum([len(p) for p in prompts]) - 1]
            live = list(range(len(prompts)))
            self._set_phase(Scope.DECODE)
            for _ in range(max_tokens):
                feed = []
                for i, token in zip(live, np.argmax(logits, axis=1).tolist()):
                    if self.model.is_eog(token) or pos[i] >= self.n_ctx:
                        continue
                    out[i].append(token)
                    if on_token is not None:
                        on_token(i, token, pos[i])
                    feed.append((i, [token], pos[i]))
                    pos[i] += 1
                if not feed:
                    break
                logits = self.decode(feed, outputs="last")
                live = [i for i, _, _ in feed]
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._set_phase(Scope.PREFILL)
        return [Generation(self.model.detokenize(o), o, p, interrupted) for o, p in zip(out, prompts)]

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 40, top_p: float = 0.95, seed: int = 0, add_bos: bool = True,
                 on_token: Callable[[str], None] | None = None) -> Generation:
        """Greedy (temperature 0) or seeded sampled continuation of a fresh sequence.

        on_token receives each generated token's text as it comes (streaming). A KeyboardInterrupt
        stops generation and returns what was generated so far, with `interrupted` set.
        """
        prompt_tokens = self.model.tokenize(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
        if not prompt_tokens:
            raise InputError("the prompt is empty")
        sampler = llama_internals.LlamaSampler()
        if temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(top_k)
            sampler.add_top_p(top_p, 1)
            sampler.add_temp(temperature)
            sampler.add_dist(seed)
        self.reset()
        out: list[int] = []
        interrupted = False
        think_open, think_close = self.model.think_markers
        thinking = False
        try:
            self._set_phase(Scope.PREFILL)
            self.decode([(0, prompt_tokens, 0)], outputs="last")
            pos = len(prompt_tokens)
            for _ in range(max_tokens):
                token = sampler.sample(self._ctx, -1)
                sampler.accept(token)
                if self.model.is_eog(token):
                    break
                out.append(token)
                if on_token is not None:
                    on_token(self.model.detokenize([token]))
                if pos >= self.n_ctx:
                    break
                thinking = (thinking or token == think_open) and token != think_close
                self._set_phase(Scope.THINKING if thinking else Scope.DECODE)
                self.decode([(0, [token], pos)])
                pos += 1
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sampler.close()
            self._set_phase(Scope.PREFILL)
        return Generation(self.model.detokenize(out), out, prompt_tokens, interrupted)
