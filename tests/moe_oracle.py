"""A pure-numpy re-implementation of llama.cpp's build_moe_ffn selection and weighting, with the steering
contract (README, Python API) applied on top: written from the contract and llama.cpp's graph, independently of
native/, so that the engine can be checked against it (tests/test_oracle.py).

Order, as the contract states it: bias first (-inf = mask); forced experts lifted to the best remaining
(unmasked, unforced) logit + epsilon; gating; selection bias (the model's exp_probs_b, masks and forces);
group-limited top-k; weights; drop before any top-k normalisation; normalisation; scale; gain last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORCE_EPSILON = 1e-3
FORCE_SELECTION = 1e6  # a forced expert's selection score bonus where the router adds a selection bias
WEIGHT_SUM_FLOOR = 6.103515625e-5  # llama.cpp clamps top-k weight sums to the smallest normal F16


@dataclass(frozen=True)
class Router:
    gating: str  # "softmax", "sigmoid", "softmax over the selected logits", "sqrt-softplus"
    k: int
    norm_w: bool
    w_scale: float = 1.0
    selection_bias: np.ndarray | None = None  # [n_expert], the model's exp_probs_b
    n_groups: int = 0
    n_group_used: int = 0


def gate(router: Router, x: np.ndarray) -> np.ndarray:
    if router.gating == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if router.gating == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if router.gating == "softmax over the selected logits":
        return x.copy()
    if router.gating == "sqrt-softplus":
        return np.sqrt(np.logaddexp(0.0, x))
    raise ValueError(f"unknown gating {router.gating!r}")


def logits_from_probs(router: Router, probs: np.ndarray) -> np.ndarray:
    """Router logits (up to a per-token constant where gating is shift-invariant) from captured probabilities."""
    p = probs.astype(np.float64)
    with np.errstate(divide="ignore"):
        if router.gating in ("softmax", "softmax over the selected logits"):  # captured as softmax(logits)
            return np.log(p)
        if router.gating == "sigmoid":
            return np.log(p) - np.log1p(-p)
        if router.gating == "sqrt-softplus":
            return np.log(np.expm1(p * p))
    raise ValueError(f"unknown gating {router.gating!r}")


@dataclass
class Steering:
    """One layer's steering in one phase, as arrays over experts."""

    bias: np.ndarray  # additive logit bias, already scaled by strength; -inf = mask
    force: np.ndarray  # bool
    drop: np.ndarray  # bool
    gain: np.ndarray

    @classmethod
    def of(cls, n_expert: int, entries, strength: float) -> Steering:
        """entries: (expert, mode, value) tuples that apply in the phase."""
        s = cls(np.zeros(n_expert), np.zeros(n_expert, bool), np.zeros(n_expert, bool), np.ones(n_expert))
        for expert, mode, value in entries:
            if mode == "mask":
                s.bias[expert] = -np.inf
            elif mode == "bias":
                if value == -np.inf:
                    if strength > 0:
                        s.bias[expert] = -np.inf
                else:
                    s.bias[expert] += value * strength
            elif mode == "force":
                s.force[expert] = True
            elif mode == "drop":
                s.drop[expert] = True
            elif mode == "gain":
                s.gain[expert] *= value
        return s


def route(router: Router, logits: np.ndarray, steering: Steering) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [T, k], weights [T, k], selection scores [T, n_expert]) for router logits [T, n_expert]."""
    x = logits.astype(np.float64) + steering.bias
    if steering.force.any():
        remaining = np.where(steering.force, x - 1e30, x)
        top = remaining.max(axis=-1, keepdims=True) + FORCE_EPSILON
        x = np.where(steering.force, top, x)
    probs = gate(router, x)
    scores = probs.copy()
    if router.selection_bias is not None:
        scores = scores + router.selection_bias
        scores = np.where(np.isneginf(steering.bias), -np.inf, scores)
        scores = scores + np.where(steering.force, FORCE_SELECTION, 0.0)
    if router.n_groups > 1:
        t, n = scores.shape
        grouped = scores.reshape(t, router.n_groups, n // router.n_groups)
        group_score = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # top-2 sum per group
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, : router.n_group_used]
        mask = np.full((t, router.n_groups), -np.inf)
        np.put_along_axis(mask, keep, 0.0, axis=-1)
        scores = (grouped + mask[..., None]).reshape(t, n)
    ids = np.argsort(-scores, axis=-1, kind="stable")[:, : router.k]
    w = np.take_along_axis(probs, ids, axis=-1)
    if router.gating == "softmax over the selected logits":
        e = np.exp(w - w.max(axis=-1, keepdims=True))
        w = e / e.sum(axis=-1, keepdims=True)
    dropped = steering.drop[ids]
    if dropped.any():
        w = np.where(dropped, 0.0, w)
        if router.gating == "softmax over the selected logits" and not router.norm_w:
            w = w / np.maximum(w.sum(axis=-1, keepdims=True), WEIGHT_SUM_FLOOR)
    if router.norm_w:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), WEIGHT_SUM_FLOOR)
    if router.w_scale not in (0.0, 1.0):
        w = w * router.w_scale
    return ids, w * steering.gain[ids], scores


def margin(scores: np.ndarray, k: int) -> np.ndarray:
    """Per token, the gap between the k-th and the (k+1)-th selection score (small: a near tie)."""
    s = np.sort(scores, axis=-1)[:, ::-1]
    with np.errstate(invalid="ignore"):
        gap = s[:, k - 1] - s[:, k]
    return np.where(np.isnan(gap), np.inf, gap)
