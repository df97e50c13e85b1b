"""Many independent generations in one session, decoded together: continuous batching with steering per sequence.

    requests = [Request(tokens, max_tokens=32, steering=profile) for ...]
    for finished in generate_many(session, requests):    # [(request index, Generation)] after each step
        ...

llama-server's habit: a fixed number of *slots* (the session's ``n_seq_max`` sequences) is fed by a queue of
requests; a request owns a slot from admission to its last token, its steering travels with it
(``Session.steer(..., seq_id=slot)``), and a finished request frees its slot for the next one. Each step
decodes the next token of every generating slot and the prompts of newly admitted ones, within ``n_batch``
tokens (:func:`plan_batch`: a long prompt is cut into chunks rather than stalling the others).

Prefill is shared where steering allows it: requests with the same prompt whose steering is the same in the
prefill phase (entries scoped ``all`` or ``prefill``; none for unsteered and decode- or thinking-scoped
steering) decode the prompt once; the others copy its cache (``llama_memory_seq_cp``) and sample their first
token from the same logits row. Their own steering applies from their first generated token on, as in
``Session.generate``.

Each sequence has a KV stream of its own (a session opened with ``kv_unified=False``, llama.cpp's default):
attention then runs over that sequence's cells only, as it does alone, so the logits do not depend on the
neighbours (a unified cache changes the float order of attention and moved greedy near-ties on a trained Q8_0
model). A copy between streams copies the stream's buffer, then drops what the source had generated beyond the
prompt.

Token choice follows ``Session.generate``: greedy is the argmax; sampling is llama.cpp's own chain (top-k,
top-p, temperature, seeded distribution) applied to the sequence's logits row, one sampler per request and
seeded by the request, so what a request draws does not depend on what it is batched with. Where a backend's
kernels sum a batch's rows in another order than one row alone, a continuation may still part from a lone
one at a near-tie (on this CPU the planted and the trained model give identical text, tests/test_batched_eval.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from mote_local.binding import llama, llama_internals
from mote_local.engine.model import Generation, Model, Session, ThinkTracker
from mote_local.errors import InputError
from mote_local.steering.entries import Entry, Scope
from mote_local.steering.profile import Profile

__all__ = [
    "Request",
    "generate_many",
    "kv_cache_bytes",
    "logits_many",
    "plan_batch",
    "prefill_key",
    "seq_capacity",
    "stream_cells",
]

MAX_LOGITS_BYTES = 256 * 2**20  # full logits held at once by logits_many
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


@dataclass(frozen=True)
class Request:
    """One generation: a fresh sequence's prompt tokens, its steering (None: unsteered), its decoding."""

    prompt: tuple[int, ...]
    max_tokens: int
    steering: Profile | None = None
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0


def prefill_key(steering: Profile | None) -> tuple:
    """What the steering does while the prompt is decoded: requests with equal keys and equal prompts can share
    one prefill (() for unsteered, decode-scoped and thinking-scoped steering)."""
    if steering is None:
        return ()
    entries = tuple(sorted(Entry(e.layer, e.expert, e.mode, e.value) for e in steering.for_scope(Scope.PREFILL)))
    return (entries, steering.strength) if entries else ()


class _Sampler:
    """llama.cpp's sampling chain of Session.generate, applied to one logits row at a time."""

    def __init__(self, r: Request, n_vocab: int):
        self._chain = llama_internals.LlamaSampler()
        self._chain.add_top_k(r.top_k)
        self._chain.add_top_p(r.top_p, 1)
        self._chain.add_temp(r.temperature)
        self._chain.add_dist(r.seed)
        self._data = (llama.llama_token_data * n_vocab)()
        # numpy's stubs list no ctypes array among buffers, though it exports the buffer protocol
        self._rows = np.frombuffer(self._data, dtype=_TOKEN_DATA)  # type: ignore[call-overload]
        self._ids = np.arange(n_vocab, dtype=np.int32)

    def sample(self, row: np.ndarray) -> int:
        rows = self._rows  # refilled each time: the samplers sort it in place
        rows["id"], rows["logit"], rows["p"] = self._ids, row, 0.0
        cur = llama.llama_token_data_array(self._data, len(row), -1, False)
        llama.llama_sampler_apply(self._chain.sampler, ctypes.byref(cur))
        token = int(cur.data[cur.selected].id)
        llama.llama_sampler_accept(self._chain.sampler, token)
        return token

    def close(self) -> None:
        self._chain.close()


@dataclass
class _Slot:
    seq_id: int
    index: int = -1  # the request it serves, into _Run.requests (-1: free)
    key: tuple = ()  # (prompt, prefill key): who may share its prefill
    feed: list[int] = field(default_factory=list)
    pos: int = 0
    prefilling: bool = False
    served: int = 0  # the step that last decoded it (prompts are chunked oldest first)
    out: list[int] = field(default_factory=list)
    phase: Scope = Scope.PREFILL
    thinking: ThinkTracker | None = None
    sampler: _Sampler | None = None
    waiting: list[_Slot] = field(default_factory=list)  # slots that will copy this one's prefill

    @property
    def busy(self) -> bool:
        return self.index >= 0


def plan_batch(ready: Sequence[_Slot], budget: int) -> list[tuple[_Slot, int]]:
    """(slot, number of its fed tokens) decoded together in the next step: one token for every slot that is
    generating, then the prompts of the others, the longest waiting first, within ``budget`` tokens in all
    (every generating slot is served even past the budget; a prompt may be cut, and goes on next step).
    A slot has ``feed``, ``phase`` (PREFILL while its prompt is fed), ``served`` and ``seq_id``."""
    generating = [(s, 1) for s in ready if s.phase is not Scope.PREFILL]
    room = budget - len(generating)
    prompts = []
    for slot in sorted((s for s in ready if s.phase is Scope.PREFILL), key=lambda s: (s.served, s.seq_id)):
        if room <= 0:
            break
        n = min(len(slot.feed), room)
        prompts.append((slot, n))
        room -= n
    return generating + prompts


class _Run:
    def __init__(self, session: Session, requests: Sequence[Request]):
        self.s = session
        self.model = session.model
        self.requests = requests
        self.markers = self.model.think_markers
        self.slots = [_Slot(i) for i in range(session.n_seq_max)]
        self.queue = list(range(len(requests)))[::-1]  # popped from the end
        self.holders: dict[tuple, list[_Slot]] = {}  # slots whose cache holds a prompt's prefill
        self.first: dict[tuple, np.ndarray] = {}  # that prefill's last logits row
        self.step = 0
        self.tokens = 0  # generated so far
        self.capacity = seq_capacity(session)
        for r in requests:
            if not r.prompt:
                raise InputError("a request's prompt is empty")
            if len(r.prompt) + r.max_tokens - 1 > self.capacity:
                raise InputError(
                    f"a prompt of {len(r.prompt)} tokens and {r.max_tokens} new ones need "
                    f"{len(r.prompt) + r.max_tokens - 1} positions but a sequence holds "
                    f"{self.capacity}: raise n_ctx"
                )

    def run(self) -> Iterator[list[tuple[int, Generation]]]:
        try:
            while self.queue or any(s.busy for s in self.slots):
                done: list[tuple[int, Generation]] = []
                self._admit(done)
                ready = [s for s in self.slots if s.busy and s.feed]
                if ready:
                    self._decode(ready, done)
                yield done
        finally:
            for slot in self.slots:
                if slot.busy:
                    self._release(slot)

    def _admit(self, done: list) -> None:
        for slot in self.slots:
            if slot.busy or not self.queue:
                continue
            index = self.queue.pop()
            r = self.requests[index]
            slot.index = index
            slot.key = (r.prompt, prefill_key(r.steering))
            slot.out, slot.served = [], self.step
            slot.thinking = self.markers.tracker(r.prompt) if self.markers is not None else None
            slot.sampler = _Sampler(r, self.model.n_vocab) if r.temperature > 0 else None
            if r.steering is not None and r.steering.entries:
                self.s.steer(r.steering, seq_id=slot.seq_id)
                self.s.set_phase(Scope.PREFILL, seq_id=slot.seq_id)
            else:
                self.s.clear_steering(seq_id=slot.seq_id)
            slot.phase = Scope.PREFILL
            holders = self.holders.get(slot.key)
            leader = next((s for s in self.slots if s.busy and s.prefilling and s.key == slot.key), None)
            if holders:  # the prompt is in the cache already: copy it
                self._copy(holders[0], slot, done)
            elif leader is not None:  # it is being decoded: copy it once done
                slot.feed, slot.prefilling = [], False
                leader.waiting.append(slot)
            else:
                slot.feed, slot.pos, slot.prefilling = list(r.prompt), 0, True

    def _copy(self, src: _Slot, dst: _Slot, done: list) -> None:
        n = len(self.requests[dst.index].prompt)
        memory = self.s._ctx.memory
        llama.llama_memory_seq_cp(memory, src.seq_id, dst.seq_id, -1, -1)  # between streams: all of it
        llama.llama_memory_seq_rm(memory, dst.seq_id, n, -1)  # then only the prompt
        dst.pos, dst.prefilling = n, False
        self.holders[dst.key].append(dst)
        self._advance(dst, self.first[dst.key], done)

    def _decode(self, ready: list[_Slot], done: list) -> None:
        batch = plan_batch(ready, self.s.n_batch)
        logits = self.s.decode([(s.seq_id, s.feed[:n], s.pos) for s, n in batch], outputs="last")
        if len(logits) != len(batch):  # capture made every token an output: keep each sequence's last row
            logits = logits[np.cumsum([n for _, n in batch]) - 1]
        self.step += 1
        for (slot, n), row in zip(batch, logits):
            slot.pos += n
            del slot.feed[:n]
            slot.served = self.step
            if slot.feed:
                continue  # the rest of its prompt next step
            if slot.prefilling:
                slot.prefilling = False
                self.holders.setdefault(slot.key, []).append(slot)
                self.first[slot.key] = row
                waiting, slot.waiting = slot.waiting, []
                for other in waiting:  # before the leader advances: it may finish, and its cells go
                    self._copy(slot, other, done)
                self._advance(slot, row, done)
            else:
                self._advance(slot, row, done)

    def _advance(self, slot: _Slot, row: np.ndarray, done: list) -> None:
        r = self.requests[slot.index]
        token = int(np.argmax(row)) if slot.sampler is None else slot.sampler.sample(row)
        if self.model.is_eog(token):
            self._finish(slot, done)
            return
        slot.out.append(token)
        self.tokens += 1
        if len(slot.out) >= r.max_tokens or slot.pos >= self.capacity:
            self._finish(slot, done)
            return
        slot.feed = [token]
        if slot.thinking is not None:
            slot.thinking.feed(token)
        self._set_phase(slot, Scope.THINKING if slot.thinking is not None and slot.thinking.inside else Scope.DECODE)

    def _set_phase(self, slot: _Slot, phase: Scope) -> None:
        """Only on a change: the engine's call is per sequence, and most steps change nothing."""
        if phase is not slot.phase:
            self.s.set_phase(phase, seq_id=slot.seq_id)
            slot.phase = phase

    def _finish(self, slot: _Slot, done: list) -> None:
        done.append(
            (
                slot.index,
                Generation(self.model.detokenize(slot.out), list(slot.out), list(self.requests[slot.index].prompt)),
            )
        )
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        holders = self.holders.get(slot.key)
        if holders and slot in holders:
            holders.remove(slot)
            if not holders:
                del self.holders[slot.key]
                self.first.pop(slot.key, None)
        slot.waiting = []  # its prefill never finished (Ctrl-C): those waiting are released with it
        self.s.forget(slot.seq_id)
        if slot.sampler is not None:
            slot.sampler.close()
        slot.index, slot.sampler, slot.feed = -1, None, []


def generate_many(session: Session, requests: Sequence[Request]) -> Generator[list[tuple[int, Generation]], None, None]:
    """Generates every request in ``session``, ``session.n_seq_max`` at a time (a session with a KV stream per
    sequence, ``kv_unified=False``): after each decode step, yields the
    requests that finished in it as (index into ``requests``, Generation). Closing the iterator early (or
    Ctrl-C) frees every slot: their memory and steering."""
    runner = _Run(session, requests)
    yield from runner.run()


def logits_many(
    session: Session,
    sequences: Sequence[tuple[Sequence[int], Profile | None]],
    *,
    max_logits_bytes: int = MAX_LOGITS_BYTES,
) -> Iterator[tuple[int, np.ndarray]]:
    """Full next-token logits [len(tokens), n_vocab] of fresh sequences, each with its own steering (None:
    unsteered) in the prefill phase, several per decode call: as many as the session's sequences and
    ``max_logits_bytes`` of logits allow. Yields (index into ``sequences``, logits), in order."""
    row_bytes = 4 * session.model.n_vocab
    capacity = seq_capacity(session)
    i = 0
    while i < len(sequences):
        group: list[int] = []
        tokens = 0
        while i < len(sequences) and len(group) < session.n_seq_max:
            n = len(sequences[i][0])
            if n > capacity:
                raise InputError(f"a sequence of {n} tokens does not fit a sequence's {capacity} positions")
            if group and (tokens + n) * row_bytes > max_logits_bytes:
                break
            group.append(i)
            tokens += n
            i += 1
        session.reset()
        for seq_id, j in enumerate(group):
            steering = sequences[j][1]
            if steering is not None and steering.entries:
                session.steer(steering, seq_id=seq_id)
                session.set_phase(Scope.PREFILL, seq_id=seq_id)
            else:
                session.clear_steering(seq_id=seq_id)
        try:
            logits = session.decode([(seq_id, sequences[j][0], 0) for seq_id, j in enumerate(group)])
        finally:
            for seq_id in range(len(group)):
                session.clear_steering(seq_id=seq_id)
        start = 0
        for j in group:
            n = len(sequences[j][0])
            yield j, logits[start : start + n]
            start += n


def seq_capacity(session: Session) -> int:
    """Positions one sequence of the session holds (its KV stream, or the whole context when unified)."""
    return llama.llama_n_ctx_seq(session._ctx_ptr)


def stream_cells(positions: int) -> int:
    """The cells llama.cpp gives each sequence's stream for ``positions`` (it rounds them up to 256)."""
    return -(-positions // 256) * 256


def kv_cache_bytes(model: Model, n_ctx: int) -> int:
    """The KV cache that a context of n_ctx cells allocates for the model (f16 K and V in every layer)."""
    meta = model.metadata
    arch = model.layout.arch

    def key(name: str, default: int = 0) -> int:
        try:
            return int(meta.get(f"{arch}.{name}", default))
        except ValueError:
            return default

    n_head = key("attention.head_count", 1)
    n_kv = key("attention.head_count_kv", n_head) or n_head
    n_embd = key("embedding_length")
    k_dim = key("attention.key_length", n_embd // max(1, n_head))
    v_dim = key("attention.value_length", n_embd // max(1, n_head))
    return model.layout.n_layer * n_ctx * n_kv * (k_dim + v_dim) * 2
