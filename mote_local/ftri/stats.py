"""fTRI statistics: which experts fire differently on behaviour prompts than on baseline prompts.

Pure numpy, no engine import. Input is the routing captured per prompt (:class:`Activations`); every method
gives one score per (layer, expert), positive = more active on behaviour prompts, with bootstrap confidence
intervals over prompts and a rank-stability figure (:func:`analyse`).

Every method is a ratio of prompt-weighted sums, so one code path serves the point estimate (each prompt
weighted once) and the bootstrap (each prompt weighted by how often a replicate drew it). A class that counted
no tokens in a layer gives no evidence there: the score is 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

__all__ = ["METHODS", "SIGNS", "Activations", "FtriResult", "RankedExpert", "analyse", "score"]

METHODS = ("mean_diff", "risk_diff", "log_odds", "weight_mass")
SIGNS = ("positive", "negative", "abs")

_OPTIONS = {"mean_diff": {}, "risk_diff": {}, "log_odds": {"alpha": 0.5}, "weight_mass": {}}
# bootstrap replicates are computed in blocks of about this many (replicate, layer, expert) cells
_BLOCK_CELLS = 1 << 21


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Activations:
    """Routing counted per prompt; arrays are copied and made read-only.

    counts[p, l, e]: counted tokens of prompt p that selected expert e in layer l.
    tokens[p, l]: tokens of prompt p counted in layer l (0 for non-MoE layers).
    weight_sums[p, l, e]: sum of expert e's final gate weights over those tokens.
    is_behavior[p]: True for a behaviour prompt, False for a baseline prompt.
    """

    counts: np.ndarray
    tokens: np.ndarray
    weight_sums: np.ndarray
    is_behavior: np.ndarray

    def __post_init__(self) -> None:
        counts = _integral("counts", self.counts, ndim=3)
        n_prompts, n_layer, n_expert = counts.shape
        tokens = _integral("tokens", self.tokens, ndim=2)
        if tokens.shape != (n_prompts, n_layer):
            raise ValueError(f"tokens has shape {tokens.shape}, expected (n_prompts, n_layer) = "
                             f"{(n_prompts, n_layer)} to match counts {counts.shape}")
        weight_sums = np.array(self.weight_sums, dtype=np.float64)
        if weight_sums.shape != counts.shape:
            raise ValueError(f"weight_sums has shape {weight_sums.shape}, expected {counts.shape} like counts")
        if not np.all(np.isfinite(weight_sums)) or np.any(weight_sums < 0):
            raise ValueError("weight_sums must be finite and >= 0 (sums of final gate weights)")
        over = counts > tokens[:, :, None]
        if over.any():
            p, l, e = (int(i) for i in np.argwhere(over)[0])
            raise ValueError(f"counts[{p}, {l}, {e}] = {counts[p, l, e]} exceeds tokens[{p}, {l}] = {tokens[p, l]}: "
                             "an expert is selected at most once per counted token")
        is_behavior = np.array(self.is_behavior)
        if is_behavior.dtype != np.bool_:
            raise ValueError(f"is_behavior must be booleans (True = behaviour prompt), got dtype {is_behavior.dtype}")
        if is_behavior.shape != (n_prompts,):
            raise ValueError(f"is_behavior has shape {is_behavior.shape}, expected ({n_prompts},), one per prompt")
        n_behavior = int(is_behavior.sum())
        if n_behavior == 0 or n_behavior == n_prompts:
            missing = "behaviour" if n_behavior == 0 else "baseline"
            raise ValueError(f"no {missing} prompt: fTRI compares two classes, give at least one prompt of each")
        for name, value in (("counts", counts), ("tokens", tokens), ("weight_sums", weight_sums),
                            ("is_behavior", is_behavior)):
            object.__setattr__(self, name, _readonly(value))

    @property
    def n_prompts(self) -> int:
        return self.counts.shape[0]

    @property
    def n_layer(self) -> int:
        return self.counts.shape[1]

    @property
    def n_expert(self) -> int:
        return self.counts.shape[2]

    @property
    def n_behavior(self) -> int:
        return int(self.is_behavior.sum())

    @property
    def n_baseline(self) -> int:
        return self.n_prompts - self.n_behavior


def _integral(name: str, value: Any, *, ndim: int) -> np.ndarray:
    a = np.array(value)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if 0 in a.shape:
        raise ValueError(f"{name} has an empty dimension (shape {a.shape}); it needs prompts, layers and experts")
    if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
        raise ValueError(f"{name} must hold finite numbers, got dtype {a.dtype}")
    if np.any(a < 0):
        raise ValueError(f"{name} must be >= 0 (token counts)")
    if a.dtype.kind == "f" and np.any(a != np.round(a)):
        raise ValueError(f"{name} must be whole numbers (token counts)")
    return a.astype(np.int64)


def _method_options(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"unknown fTRI method {method!r}; choose one of {', '.join(METHODS)}")
    allowed = _OPTIONS[method]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no options"
        raise ValueError(f"{method} takes {takes}; got {', '.join(unknown)}")
    merged = {**allowed, **opts}
    if "alpha" in merged:
        alpha = float(merged["alpha"])
        if not (np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha (the log-odds pseudo-count) must be a finite number > 0, got {merged['alpha']!r}")
        merged["alpha"] = alpha
    return merged


def _inputs(act: Activations, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(x [P, L*E], d [P, L]): a class's value in a layer is sum(w*x) / sum(w*d) over its prompts."""
    present = act.tokens > 0
    if method in ("mean_diff", "weight_mass"):
        # per-prompt maps; a prompt that counted no tokens in a layer has no map there and is left out
        num = act.counts if method == "mean_diff" else act.weight_sums
        safe = np.where(present, act.tokens, 1)[:, :, None]
        x = np.where(present[:, :, None], num / safe, 0.0)
        d = present
    else:  # pooled over the class's tokens
        x, d = act.counts, act.tokens
    return x.reshape(act.n_prompts, -1).astype(np.float64), d.astype(np.float64)


def _class_sums(w: np.ndarray, x: np.ndarray, d: np.ndarray, n_layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum(w*x) [R, L, E], sum(w*d) [R, L, 1]) for R rows of weights w [R, P] over one class's prompts."""
    return (w @ x).reshape(w.shape[0], n_layer, -1), (w @ d)[:, :, None]


def _combine(method: str, opts: dict[str, Any], b: tuple[np.ndarray, np.ndarray],
             n: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Scores [R, L, E] from the behaviour and baseline class sums."""
    (xb, db), (xn, dn) = b, n
    valid = (db > 0) & (dn > 0)
    if method == "log_odds":
        a = opts["alpha"]
        # the pseudo-count alone would rate an expert that never fired by the classes' token totals
        valid = valid & (xb + xn > 0)
        out = np.log((xb + a) / (db - xb + a)) - np.log((xn + a) / (dn - xn + a))
    else:
        out = xb / np.where(db > 0, db, 1.0) - xn / np.where(dn > 0, dn, 1.0)
    return np.where(valid, out, 0.0)


def _point(act: Activations, method: str, opts: dict[str, Any], x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Scores [L, E] with every prompt weighted once."""
    b, n = act.is_behavior, ~act.is_behavior
    sums = [_class_sums(np.ones((1, int(m.sum()))), x[m], d[m], act.n_layer) for m in (b, n)]
    return _combine(method, opts, *sums)[0]


def score(act: Activations, method: str, **opts: Any) -> np.ndarray:
    """Scores [n_layer, n_expert] of one method (see METHODS); log_odds takes alpha (default 0.5)."""
    opts = _method_options(method, opts)
    return _point(act, method, opts, *_inputs(act, method))


def _check_sign(sign: str) -> None:
    if sign not in SIGNS:
        raise ValueError(f"unknown sign {sign!r}; choose one of {', '.join(SIGNS)}")


def _sign_key(values: np.ndarray, sign: str) -> np.ndarray:
    _check_sign(sign)
    return values if sign == "positive" else -values if sign == "negative" else np.abs(values)


def _resample_weights(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """[n_boot, n]: how often each replicate drew each of a class's n prompts, drawing n with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _top_membership(boot: np.ndarray, sign: str, top_n: int) -> np.ndarray:
    """Fraction of replicates [R, cells] in which each cell is in the top N and has the chosen sign."""
    key = _sign_key(boot, sign)
    top_n = min(top_n, key.shape[1])
    nth = -np.partition(-key, top_n - 1, axis=1)[:, top_n - 1 : top_n]
    above, tied = key > nth, key == nth
    # ties at the N-th place go to the lowest (layer, expert), as in FtriResult.ranked
    room = top_n - above.sum(axis=1, keepdims=True)
    hit = above | (tied & (np.cumsum(tied, axis=1) <= room))
    # a score of 0 (or of the other sign) is no evidence, even when fewer than N experts have any
    return (hit & (key > 0)).mean(axis=0)


@dataclass(frozen=True)
class RankedExpert:
    layer: int
    expert: int
    score: float
    ci_low: float
    ci_high: float
    stability: float


@dataclass
class FtriResult:
    """Scores with bootstrap percentile intervals and rank stability, all [n_layer, n_expert]."""

    method: str
    scores: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    stability: np.ndarray
    top_n: int
    sign: str
    n_behavior: int
    n_baseline: int
    level: float = 0.95
    n_boot: int = 200
    options: dict[str, Any] = field(default_factory=dict)

    def ranked(self, n: int | None = None, sign: str | None = None, per_layer_cap: int | None = None,
               layers: Iterable[int] | None = None) -> list[RankedExpert]:
        """Experts ordered by score (sign "positive"), -score ("negative") or |score| ("abs"), ties by
        (layer, expert); at most per_layer_cap per layer, only the given layers, the first n."""
        n_layer, n_expert = self.scores.shape
        key = _sign_key(self.scores, self.sign if sign is None else sign).ravel()
        flat = np.arange(key.size)
        order = np.lexsort((flat, -key))
        if layers is not None:
            keep = sorted(set(int(l) for l in layers))
            bad = [l for l in keep if not 0 <= l < n_layer]
            if bad:
                raise ValueError(f"layers {bad} out of range; this result has layers 0..{n_layer - 1}")
            order = order[np.isin(order // n_expert, keep)]
        out: list[RankedExpert] = []
        per_layer: dict[int, int] = {}
        for i in order:
            if n is not None and len(out) >= n:
                break
            layer, expert = divmod(int(i), n_expert)
            if per_layer_cap is not None:
                if per_layer.get(layer, 0) >= per_layer_cap:
                    continue
                per_layer[layer] = per_layer.get(layer, 0) + 1
            out.append(RankedExpert(layer, expert, float(self.scores[layer, expert]),
                                    float(self.ci_low[layer, expert]), float(self.ci_high[layer, expert]),
                                    float(self.stability[layer, expert])))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; from_dict restores it."""
        return {
            "method": self.method, "top_n": int(self.top_n), "sign": self.sign,
            "n_behavior": int(self.n_behavior), "n_baseline": int(self.n_baseline),
            "level": float(self.level), "n_boot": int(self.n_boot), "options": dict(self.options),
            **{k: np.asarray(getattr(self, k), dtype=np.float64).tolist() for k in _ARRAYS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FtriResult:
        missing = [k for k in (*_ARRAYS, "method", "top_n", "sign", "n_behavior", "n_baseline") if k not in data]
        if missing:
            raise ValueError(f"fTRI result is missing {', '.join(missing)}; was it written by FtriResult.to_dict?")
        if data["method"] not in METHODS:
            raise ValueError(f"fTRI result has unknown method {data['method']!r}; known: {', '.join(METHODS)}")
        _check_sign(data["sign"])
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in _ARRAYS}
        shape = arrays["scores"].shape
        if len(shape) != 2 or any(a.shape != shape for a in arrays.values()):
            shapes = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
            raise ValueError(f"fTRI result arrays must share one [n_layer, n_expert] shape, got {shapes}")
        return cls(method=data["method"], top_n=int(data["top_n"]), sign=data["sign"],
                   n_behavior=int(data["n_behavior"]), n_baseline=int(data["n_baseline"]),
                   level=float(data.get("level", 0.95)), n_boot=int(data.get("n_boot", 200)),
                   options=dict(data.get("options", {})), **arrays)


_ARRAYS = ("scores", "ci_low", "ci_high", "stability")


def analyse(act: Activations, method: str, *, n_boot: int = 200, level: float = 0.95, top_n: int = 10,
            sign: str = "positive", seed: int = 0, **opts: Any) -> FtriResult:
    """Scores of one method with bootstrap percentile CIs (prompts resampled with replacement within each
    class, n_boot replicates) and rank stability: the fraction of replicates in which an expert is among the
    top_n by the chosen sign with a score of that sign."""
    opts = _method_options(method, opts)
    _check_sign(sign)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1:
        raise ValueError(f"top_n must be an integer >= 1, got {top_n!r}")
    x, d = _inputs(act, method)
    scores = _point(act, method, opts, x, d)
    b, n = act.is_behavior, ~act.is_behavior
    xb, db, xn, dn = x[b], d[b], x[n], d[n]
    rng = np.random.default_rng(seed)
    wb, wn = (_resample_weights(rng, act.n_behavior, n_boot), _resample_weights(rng, act.n_baseline, n_boot))
    cells = act.n_layer * act.n_expert
    boot = np.empty((n_boot, cells))
    block = max(1, _BLOCK_CELLS // cells)
    for start in range(0, n_boot, block):
        rows = slice(start, start + block)
        sums_b = _class_sums(wb[rows], xb, db, act.n_layer)
        sums_n = _class_sums(wn[rows], xn, dn, act.n_layer)
        boot[rows] = _combine(method, opts, sums_b, sums_n).reshape(-1, cells)
    tail = (1.0 - level) / 2.0
    ci_low, ci_high = np.quantile(boot, [tail, 1.0 - tail], axis=0)
    shape = scores.shape
    return FtriResult(method=method, scores=scores, ci_low=ci_low.reshape(shape), ci_high=ci_high.reshape(shape),
                      stability=_top_membership(boot, sign, top_n).reshape(shape), top_n=int(top_n), sign=sign,
                      n_behavior=act.n_behavior, n_baseline=act.n_baseline, level=float(level),
                      n_boot=int(n_boot), options=opts)
