"""Each request's own routing (``return_routing``), counted by the session's routing capture.

A request that asks for its routing gets a fresh capture label, bound to its sequence slot from its first
prompt token to its last completion token, so the engine attributes exactly its tokens to it (the capture
contract: per sequence and position, under any batch and ubatch split). The capture runs only while such a
request is in flight, and is restarted now and then to bound its memory; what a running request counted
before a restart is carried over, so its totals never depend on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mote_local.engine import Capture, Session
from mote_local.serve.types import Routing

__all__ = ["RoutingBook"]


@dataclass
class _Account:
    seq_id: int
    detail: bool
    counts: np.ndarray
    weight_sums: np.ndarray
    tokens: np.ndarray
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


class RoutingBook:
    """Opens and closes per-request routing accounts on one session (used by the scheduler's thread only)."""

    def __init__(self, session: Session, *, labels_per_capture: int = 256, traced_labels_per_capture: int = 32):
        self._session = session
        self._layout = session.model.layout
        self._limits = (labels_per_capture, traced_labels_per_capture)
        self._cm = None
        self._cap: Capture | None = None
        self._tracing = False
        self._labels_in_capture = 0
        self._accounts: dict[int, _Account] = {}
        self._next = 0

    @property
    def active(self) -> bool:
        return self._cap is not None

    def open(self, seq_id: int, detail: bool) -> int:
        """Starts counting sequence seq_id's tokens for a new request; returns its label."""
        label, self._next = self._next, (self._next + 1) % 2**31
        n_layer, n_expert = self._layout.n_layer, self._layout.n_expert
        self._accounts[label] = _Account(seq_id, detail, np.zeros((n_layer, n_expert), np.int64),
                                         np.zeros((n_layer, n_expert)), np.zeros(n_layer, np.int64))
        if self._cap is None or (detail and not self._tracing) or self._full():
            self._restart()
        else:
            self._cap.bind(seq_id, label)
            self._labels_in_capture += 1
        return label

    def close(self, label: int, *, want: bool = True) -> Routing | None:
        """Ends a request's account; its routing (None when not wanted, e.g. for a cancelled request)."""
        acc = self._accounts.pop(label)
        routing = None
        if want:
            self._carry(label, acc)
            routing = self._routing(acc)
        if self._accounts:
            self._cap.bind(acc.seq_id, label, 0, 0)  # the slot counts nothing until it is bound again
        else:
            self._stop()
        return routing

    def maybe_compact(self) -> None:
        """Restarts the capture when it holds too many finished requests' labels (memory stays bounded)."""
        if self._cap is not None and self._full():
            self._restart()

    def stop(self) -> None:
        self._accounts.clear()
        self._stop()

    # internals
    def _full(self) -> bool:
        return self._labels_in_capture >= self._limits[1 if self._tracing else 0]

    def _restart(self) -> None:
        """Moves what the running capture counted into the accounts, then starts a fresh capture."""
        if self._cap is not None:
            self._stop(carry=True)
        self._tracing = any(acc.detail for acc in self._accounts.values())
        self._cm = self._session.capture(trace=self._tracing, label=None)
        self._cap = self._cm.__enter__()
        for label, acc in self._accounts.items():
            self._cap.bind(acc.seq_id, label)
        self._labels_in_capture = len(self._accounts)

    def _stop(self, carry: bool = False) -> None:
        if self._cap is None:
            return
        cm, cap = self._cm, self._cap
        self._cm = self._cap = None
        cm.__exit__(None, None, None)  # snapshots the capture's results, then stops it
        if carry:
            for label, acc in self._accounts.items():
                self._carry(label, acc, cap)

    def _carry(self, label: int, acc: _Account, cap: Capture | None = None) -> None:
        """Adds what capture `cap` (default: the running one) counted under `label` to the account."""
        cap = cap or self._cap
        if cap is None:
            return
        if label in cap.labels:
            stats = cap.stats(label)
            acc.counts += stats.counts
            acc.weight_sums += stats.weight_sums
            acc.tokens += stats.tokens
        if acc.detail and cap.trace_enabled:
            trace = cap.trace()
            mine = trace.label == label
            acc.rows.append((trace.pos[mine], trace.layer[mine], trace.ids[mine], trace.weights[mine]))

    def _routing(self, acc: _Account) -> Routing:
        layers = list(self._layout.moe_layers)
        out = Routing(layers=layers, n_expert=self._layout.n_expert, n_expert_used=self._layout.n_expert_used,
                      tokens=acc.tokens[layers].tolist(), counts=acc.counts[layers].tolist(),
                      weight_sums=acc.weight_sums[layers].tolist())
        if acc.detail:
            pos, layer, ids, weights = (np.concatenate(cols) for cols in zip(*acc.rows)) if acc.rows else \
                (np.zeros(0, np.int64),) * 4
            positions = sorted(set(pos.tolist()))
            row_of = {p: i for i, p in enumerate(positions)}
            col_of = {l: i for i, l in enumerate(layers)}
            k = self._layout.n_expert_used
            experts = np.full((len(positions), len(layers), k), -1, np.int64)
            weight = np.zeros((len(positions), len(layers), k))
            for r in range(len(pos)):
                experts[row_of[int(pos[r])], col_of[int(layer[r])]] = ids[r]
                weight[row_of[int(pos[r])], col_of[int(layer[r])]] = weights[r]
            out.positions, out.experts, out.weights = positions, experts.tolist(), weight.tolist()
        return out
