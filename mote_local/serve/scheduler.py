"""The engine side of `mote serve`: sequence slots fed by a queue, continuous batching, one thread.

llama-server's habit: a request owns a *slot* (one sequence of the shared llama.cpp context, ``n_seq_max``
of them) from admission to its last token, and its options (sampling, stop strings, steering, routing)
travel with it. One thread owns the session (a llama.cpp context is not thread-safe); each step it admits
waiting requests into free slots, decodes the prompts of new requests and the last token of running ones
in one ``Session.decode`` call, samples each request's next token with the request's own sampler, and hands
text to the request's listener. A cancelled request (its client went away) frees its slot at the next step.

Steering: every slot carries its own (``Session.steer(..., seq_id=slot)``: the engine gives each token its
sequence's row of the steering input), so differently steered requests share one decode call. The
scheduler puts in the entries of the slot's current phase (prefill, decode, thinking), already resolved.

What one step decodes is decided by one function, :func:`plan_batch`: the next token of every generating
slot, then prompts, oldest first, cut into chunks so that a step holds at most ``n_batch`` tokens (a long
prompt does not stall the others' replies; llama-server's chunked prefill).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mote_local.engine import Model, Session
from mote_local.engine.model import ThinkTracker
from mote_local.errors import MoteError, SteeringError
from mote_local.serve.routing import RoutingBook
from mote_local.serve.sampling import Sampler, SamplingParams, TextStream
from mote_local.serve.steering import SteeringKey, steering_key
from mote_local.serve.types import Routing
from mote_local.steering.entries import Scope
from mote_local.steering.profile import Profile

__all__ = ["Done", "Failed", "Job", "Scheduler", "ServerBusy", "Text", "plan_batch"]

log = logging.getLogger("mote.serve")

PHASES = (Scope.PREFILL, Scope.DECODE, Scope.THINKING)


# ------------------------------------------------------------------------------------------------ events

@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (end of generation or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    routing: Routing | None = None


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    type: str = "server_error"
    code: str | None = None


Event = Text | Done | Failed


class ServerBusy(MoteError):
    """Every slot is busy and the queue is full."""


@dataclass
class Job:
    """One request, as the scheduler sees it. ``deliver`` is called from the scheduler's thread."""

    prompt: list[int]
    max_tokens: int
    deliver: Callable[[Event], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    profile: Profile | None = None
    routing: str | None = None  # None, "counts" or "tokens"
    cancelled: threading.Event = field(default_factory=threading.Event)
    keys: dict[Scope, SteeringKey] = field(init=False)

    def __post_init__(self):
        self.keys = {phase: steering_key(self.profile, phase) for phase in PHASES}

    def cancel(self) -> None:
        self.cancelled.set()


# ------------------------------------------------------------------------------------------------ slots

@dataclass
class Slot:
    seq_id: int
    job: Job | None = None
    feed: list[int] = field(default_factory=list)  # tokens still to decode: the prompt's rest, or the last token
    pos: int = 0
    phase: Scope = Scope.PREFILL
    thinking: ThinkTracker | None = None  # follows the model's thinking markers (thinking-scoped steering)
    generated: int = 0
    served: int = 0            # the step that last decoded this slot (prompts are chunked oldest first)
    finishing: str | None = None  # finish reason, when the next decode only routes the last token
    label: int | None = None   # routing capture label
    sampler: Sampler | None = None
    text: TextStream | None = None
    applied: SteeringKey = ()  # the slot's own steering in the engine

    @property
    def key(self) -> SteeringKey:
        return self.job.keys[self.phase]


def plan_batch(ready: Sequence[Slot], budget: int) -> list[tuple[Slot, int]]:
    """(slot, number of its fed tokens) decoded together in the next step: one token for every slot that is
    generating, then the prompts of the others, the longest waiting first, within ``budget`` tokens in all
    (every generating slot is served even past the budget; a prompt may be cut, and goes on next step)."""
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


# ------------------------------------------------------------------------------------------------ scheduler

class Scheduler:
    """Runs requests on one session of `model` in a background thread."""

    def __init__(self, model: Model, *, n_ctx: int, n_seq_max: int, n_batch: int = 512, n_threads: int | None = None,
                 max_queue: int = 256, slot_ctx: int | None = None):
        self.model = model
        self.session: Session = model.session(n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, kv_unified=True,
                                              n_threads=n_threads)
        n_seq = self.session.n_seq_max
        limit = self.session.n_ctx // n_seq
        if model.layout.context_length:
            limit = min(limit, model.layout.context_length)
        self.slot_ctx = min(limit, slot_ctx) if slot_ctx else limit
        self.max_queue = max_queue
        self.think_markers = model.think_markers
        self._slots = [Slot(i) for i in range(n_seq)]
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.unavailable: str | None = None  # why the engine can serve nothing more (its model was lost)
        self._clock = itertools.count(1)
        self._now = 0
        self.routing = RoutingBook(self.session)
        self.steps = 0                 # decode calls so far
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.peak_groups = 0           # most distinct steerings in flight at once
        self.mixed_steps = 0           # decode calls that held differently steered requests
        self._thread = threading.Thread(target=self._run, name="mote-serve-engine", daemon=True)

    # public side (any thread)
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise ServerBusy(self.unavailable or "the server is shutting down")
            for queued in [j for j in self._queue if j.cancelled.is_set()]:
                self._queue.remove(queued)
            free = sum(1 for s in self._slots if s.job is None)
            if len(self._queue) >= self.max_queue + free:
                raise ServerBusy(f"all {len(self._slots)} slots are busy and {len(self._queue)} requests are "
                                 "waiting: retry later")
            self._queue.append(job)
            self._cv.notify()

    def wake(self) -> None:
        """Lets the thread see a cancellation now rather than at its next step."""
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Fails waiting and running requests ("shutting down"), then ends the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def close(self) -> None:
        self.stop()
        self.session.close()

    def status(self) -> dict[str, int]:
        with self._cv:
            busy = sum(1 for s in self._slots if s.job is not None)
            return {"slots_idle": len(self._slots) - busy, "slots_processing": busy, "requests_waiting": len(self._queue)}

    # the thread
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._queue and not any(s.job for s in self._slots):
                        self._cv.wait()
                    if self._stopping:
                        break
                    self._admit()
                try:
                    self._step()
                except Exception as err:  # a bug: fail what is running, keep serving
                    log.exception("scheduler step failed")
                    for slot in self._slots:
                        if slot.job is not None:
                            self._fail(slot, Failed(500, f"internal error: {err}"))
        finally:
            with self._cv:
                self._stopping = True
                queued, self._queue = list(self._queue), collections.deque()
            gone = Failed(503, self.unavailable or "the server is shutting down", "server_error", "shutting_down")
            for job in queued:
                job.deliver(gone)
            lost = self.session.closed  # with its model: no cache cell, steering or capture is left to free
            for slot in self._slots:
                if slot.job is not None and lost:
                    slot.job.deliver(gone)
                    slot.job = None
                elif slot.job is not None:
                    self._fail(slot, gone)
            if not lost:
                self.routing.stop()

    def _admit(self) -> None:
        """Moves waiting requests into free slots (caller holds the lock)."""
        for slot in self._slots:
            if slot.job is not None:
                continue
            while self._queue and self._queue[0].cancelled.is_set():
                self._queue.popleft()
            if not self._queue:
                return
            self._start(slot, self._queue.popleft())

    def _start(self, slot: Slot, job: Job) -> None:
        slot.job, slot.feed, slot.pos, slot.phase = job, list(job.prompt), 0, Scope.PREFILL
        slot.thinking = self.think_markers.tracker(job.prompt) if self.think_markers is not None else None
        slot.generated, slot.finishing = 0, None
        slot.served = self._now
        slot.sampler = Sampler(job.params)
        slot.text = TextStream(self.model.token_bytes, job.stop)
        slot.label = self.routing.open(slot.seq_id, job.routing == "tokens") if job.routing else None

    def _step(self) -> None:
        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                self._release(slot)
        ready = [s for s in self._slots if s.job is not None]
        if not ready:
            return
        self.peak_groups = max(self.peak_groups, len({s.key for s in ready}))
        batch = plan_batch(ready, self.session.n_batch)
        failed = []
        for slot, _ in batch:
            try:
                self._steer(slot)
            except SteeringError as err:  # validated when the request came in; the engine has the last word
                self._fail(slot, Failed(400, str(err), "invalid_request_error", "invalid_steering"))
                failed.append(slot)
        batch = [(slot, n) for slot, n in batch if slot not in failed]
        if not batch:
            return
        self.routing.maybe_compact()
        try:
            logits = self.session.decode([(s.seq_id, s.feed[:n], s.pos) for s, n in batch], outputs="last")
        except MoteError as err:
            if self.session.model.closed:  # an rpc server was lost: nothing more can be served
                with self._cv:
                    self.unavailable = f"the model is gone ({err}); restart mote serve"
                    self._stopping = True
                return  # the thread ends: every request in flight or waiting gets the reason (503)
            for slot, _ in batch:
                self._fail(slot, Failed(500, f"decoding failed: {err}"))
            return
        if len(logits) != len(batch):  # capture made every token an output: keep each sequence's last row
            logits = logits[np.cumsum([n for _, n in batch]) - 1]
        self._now = next(self._clock)
        self.steps += 1
        self.batch_sizes[len(batch)] += 1
        self.mixed_steps += len({s.key for s, _ in batch}) > 1
        for (slot, n), row in zip(batch, logits):
            slot.pos += n
            del slot.feed[:n]
            slot.served = self._now
            if slot.feed:
                continue  # the rest of its prompt next step
            if slot.finishing:
                self._finish(slot, slot.finishing)
            else:
                self._advance(slot, row)

    def _steer(self, slot: Slot) -> None:
        """Puts the slot's steering for its current phase into the engine, when it changed."""
        if slot.key == slot.applied:
            return
        if slot.key:
            entries, strength = slot.key
            self.session.steer(Profile(entries, strength), seq_id=slot.seq_id)
        else:
            self.session.clear_steering(seq_id=slot.seq_id)
        slot.applied = slot.key

    def _advance(self, slot: Slot, logits: np.ndarray) -> None:
        job = slot.job
        token = slot.sampler.sample(logits)
        if self.model.is_eog(token):
            self._finish(slot, "stop")
            return
        slot.generated += 1
        text = slot.text.push(token)
        if text:
            job.deliver(Text(text))
        reason = ("stop" if slot.text.stopped else
                  "length" if slot.generated >= job.max_tokens or slot.pos >= self.slot_ctx else None)
        slot.feed = [token]
        if slot.thinking is not None:
            slot.thinking.feed(token)
        slot.phase = Scope.THINKING if slot.thinking is not None and slot.thinking.inside else Scope.DECODE
        if reason is None:
            return
        if slot.label is not None and slot.pos < self.slot_ctx:
            slot.finishing = reason  # decode the last token too, so that the routing covers every token
        else:
            self._finish(slot, reason)

    def _finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        tail = slot.text.finish()
        if tail:
            job.deliver(Text(tail))
        routing = None
        if slot.label is not None:
            routing = self.routing.close(slot.label)
            slot.label = None
        job.deliver(Done(reason, len(job.prompt), slot.generated, routing))
        self._release(slot)

    def _fail(self, slot: Slot, failure: Failed) -> None:
        slot.job.deliver(failure)
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        """Frees the slot: its cache cells, its steering, its routing account."""
        if slot.label is not None:
            self.routing.close(slot.label, want=False)
            slot.label = None
        self.session.forget(slot.seq_id)
        if slot.applied:
            self.session.clear_steering(seq_id=slot.seq_id)
            slot.applied = ()
        with self._cv:
            slot.job = None
