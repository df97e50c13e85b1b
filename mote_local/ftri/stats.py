"""fTRI statistics: which experts fire differently on behaviour prompts than on baseline prompts.

Pure numpy, no engine import. Input is the routing captured per prompt (:class:`Activations`); every method
gives one score per (layer, expert), positive = more active on behaviour prompts, with bootstrap confidence
intervals over prompts and a rank-stability figure (:func:`analyse`).

==============  ==============================================================================================
``mean_diff``   class mean of per-prompt selection rates, behaviour minus baseline (the paper's score)
``risk_diff``   per-token selection rate of each class (tokens pooled), behaviour minus baseline
``log_odds``    log odds ratio of the two classes' per-token selection rates; each rate is put on a common
                basis of m tokens (m: the mean of the classes' token totals in the layer) before the pseudo-count
                ``alpha`` is added, so the score depends on the rates alone: equal rates score 0 whatever the
                prompt lengths, an expert selected on every token scores 0
``weight_mass`` class mean of per-prompt gate weight per token, behaviour minus baseline
``reap``        output-aware (REAP / EASY-EP): gate weight x L2 norm of the expert's output, averaged over the
                tokens routed to the expert in each class (0 in a class that never routed to it), behaviour minus
                baseline. Needs the capture's output norms (:attr:`Activations.output_norm_sums`)
==============  ==============================================================================================

Every method is a ratio of prompt-weighted sums, so one code path serves the point estimate (each prompt
weighted once) and the bootstrap (each prompt weighted by how often a replicate drew it). A class that counted
no tokens in a layer gives no evidence there: the score is 0, never NaN.

Two intervals per expert, both at ``level`` (95%): the bootstrap percentile interval of that expert alone
(``ci_low``, ``ci_high``), and the simultaneous band (:meth:`FtriResult.band`): score ± c·se, se the bootstrap
standard error and c the ``level`` quantile over replicates of the largest |replicate − score| / se over all
experts (the sup-t band, Montiel Olea & Plagborg-Møller 2019), taken to Student's t with min(n_behaviour,
n_baseline) − 1 degrees of freedom (the standard errors are themselves estimated from few prompts), so that the
band covers every expert's true score at once with probability about ``level``. Among a model's thousands of
experts about 2.5% of those without signal have a per-expert interval above 0 by chance; the band is what an
export relies on.

:meth:`FtriResult.qualified` says which experts carry evidence: a score of the requested sign whose band (or,
asked, its per-expert interval) excludes 0 or lies beyond a threshold; :meth:`FtriResult.evidence` ranks those,
capped at N.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ALL_METHODS",
    "METHODS",
    "OUTPUT_METHODS",
    "SIGNS",
    "Activations",
    "FtriResult",
    "RankedExpert",
    "analyse",
    "score",
]

#: Methods that read the routing alone (selections, gate weights): every capture has what they need.
METHODS = ("mean_diff", "risk_diff", "log_odds", "weight_mass")
#: Methods that also read the experts' output norms (Activations.output_norm_sums).
OUTPUT_METHODS = ("reap",)
ALL_METHODS = METHODS + OUTPUT_METHODS
SIGNS = ("positive", "negative", "abs")

_OPTIONS = {"mean_diff": {}, "risk_diff": {}, "log_odds": {"alpha": 0.5}, "weight_mass": {}, "reap": {}}
# bootstrap replicates are computed in blocks of about this many (replicate, layer, expert) cells
_BLOCK_CELLS = 1 << 21
#: What an interval of evidence is: the simultaneous band over all experts, or each expert's own interval.
EVIDENCE = ("simultaneous", "per-expert")
#: Fewer bootstrap replicates than this give no evidence: their intervals and band say little about 95%.
MIN_BOOT_EVIDENCE = 20


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
    output_norm_sums[p, l, e] (optional): sum over those tokens of the final gate weight times the L2 norm of
    expert e's output before weighting; the ``reap`` method needs it.
    """

    counts: np.ndarray
    tokens: np.ndarray
    weight_sums: np.ndarray
    is_behavior: np.ndarray
    output_norm_sums: np.ndarray | None = None

    def __post_init__(self) -> None:
        counts = _integral("counts", self.counts, ndim=3)
        n_prompts, n_layer, n_expert = counts.shape
        tokens = _integral("tokens", self.tokens, ndim=2)
        if tokens.shape != (n_prompts, n_layer):
            raise ValueError(
                f"tokens has shape {tokens.shape}, expected (n_prompts, n_layer) = "
                f"{(n_prompts, n_layer)} to match counts {counts.shape}"
            )
        weight_sums = np.array(self.weight_sums, dtype=np.float64)
        if weight_sums.shape != counts.shape:
            raise ValueError(f"weight_sums has shape {weight_sums.shape}, expected {counts.shape} like counts")
        if not np.all(np.isfinite(weight_sums)) or np.any(weight_sums < 0):
            raise ValueError("weight_sums must be finite and >= 0 (sums of final gate weights)")
        over = counts > tokens[:, :, None]
        if over.any():
            p, l, e = (int(i) for i in np.argwhere(over)[0])
            raise ValueError(
                f"counts[{p}, {l}, {e}] = {counts[p, l, e]} exceeds tokens[{p}, {l}] = {tokens[p, l]}: "
                "an expert is selected at most once per counted token"
            )
        is_behavior = np.array(self.is_behavior)
        if is_behavior.dtype != np.bool_:
            raise ValueError(f"is_behavior must be booleans (True = behaviour prompt), got dtype {is_behavior.dtype}")
        if is_behavior.shape != (n_prompts,):
            raise ValueError(f"is_behavior has shape {is_behavior.shape}, expected ({n_prompts},), one per prompt")
        n_behavior = int(is_behavior.sum())
        if n_behavior == 0 or n_behavior == n_prompts:
            missing = "behaviour" if n_behavior == 0 else "baseline"
            raise ValueError(f"no {missing} prompt: fTRI compares two classes, give at least one prompt of each")
        for name, value in (
            ("counts", counts),
            ("tokens", tokens),
            ("weight_sums", weight_sums),
            ("is_behavior", is_behavior),
        ):
            object.__setattr__(self, name, _readonly(value))
        if self.output_norm_sums is not None:
            norms = np.array(self.output_norm_sums, dtype=np.float64)
            if norms.shape != counts.shape:
                raise ValueError(f"output_norm_sums has shape {norms.shape}, expected {counts.shape} like counts")
            if not np.all(np.isfinite(norms)) or np.any(norms < 0):
                raise ValueError("output_norm_sums must be finite and >= 0 (sums of gate weight x output norm)")
            if np.any((counts == 0) & (norms > 0)):
                p, l, e = (int(i) for i in np.argwhere((counts == 0) & (norms > 0))[0])
                raise ValueError(
                    f"output_norm_sums[{p}, {l}, {e}] is {norms[p, l, e]} but the expert was never "
                    "selected there: the sum runs over the tokens routed to it"
                )
            object.__setattr__(self, "output_norm_sums", _readonly(norms))

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
    if method not in ALL_METHODS:
        raise ValueError(f"unknown fTRI method {method!r}; choose one of {', '.join(ALL_METHODS)}")
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


def _inputs(act: Activations, method: str) -> tuple[np.ndarray, ...]:
    """Per-prompt arrays [P, L*E] or [P, L] whose prompt-weighted class sums _combine turns into scores:
    (x, d), a class's value in a layer being sum(w*x) / sum(w*d) over its prompts; reap adds the layer's
    tokens (x and d are then per expert: output-norm sums over routed tokens, and the routed counts)."""
    present = act.tokens > 0
    if method in ("mean_diff", "weight_mass"):
        # per-prompt maps; a prompt that counted no tokens in a layer has no map there and is left out
        num = act.counts if method == "mean_diff" else act.weight_sums
        safe = np.where(present, act.tokens, 1)[:, :, None]
        arrays: tuple[np.ndarray, ...] = (np.where(present[:, :, None], num / safe, 0.0), present)
    elif method == "reap":
        if act.output_norm_sums is None:
            raise ValueError(
                "reap needs the experts' output norms (Activations.output_norm_sums), which this capture does not have"
            )
        arrays = (act.output_norm_sums, act.counts, act.tokens)
    else:  # pooled over the class's tokens
        arrays = (act.counts, act.tokens)
    return tuple(a.reshape(act.n_prompts, -1).astype(np.float64) for a in arrays)


def _class_sums(w: np.ndarray, arrays: tuple[np.ndarray, ...], n_layer: int) -> tuple[np.ndarray, ...]:
    """The prompt-weighted sums of each array, [R, L, E] (or [R, L, 1] for per-layer arrays), for R rows of
    weights w [R, P] over one class's prompts."""
    return tuple((w @ a).reshape(w.shape[0], n_layer, -1) for a in arrays)


def _safe_ratio(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    return x / np.where(d > 0, d, 1.0)


def _combine(method: str, opts: dict[str, Any], b: tuple[np.ndarray, ...], n: tuple[np.ndarray, ...]) -> np.ndarray:
    """Scores [R, L, E] from the behaviour and baseline class sums."""
    if method == "reap":
        (xb, cb, db), (xn, cn, dn) = b, n
        # the mean over the tokens routed to the expert; 0 where a class never routed to it
        out = _safe_ratio(xb, cb) - _safe_ratio(xn, cn)
        return np.where((db > 0) & (dn > 0), out, 0.0)
    (xb, db), (xn, dn) = b, n
    valid = (db > 0) & (dn > 0)
    rb, rn = _safe_ratio(xb, db), _safe_ratio(xn, dn)
    if method == "log_odds":
        a = opts["alpha"]
        # both rates on one basis of m tokens: the pseudo-count weighs the same in both classes, so equal rates
        # (an expert selected on every token, say) score 0 however the classes' token totals differ
        m = (db + dn) / 2.0
        # the pseudo-count alone would rate an expert that never fired
        valid = valid & (xb + xn > 0)
        out = np.log((m * rb + a) / (m * (1.0 - rb) + a)) - np.log((m * rn + a) / (m * (1.0 - rn) + a))
    else:
        out = rb - rn
    return np.where(valid, out, 0.0)


def _point(act: Activations, method: str, opts: dict[str, Any], arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    """Scores [L, E] with every prompt weighted once."""
    b, n = act.is_behavior, ~act.is_behavior
    sums = [_class_sums(np.ones((1, int(m.sum()))), tuple(a[m] for a in arrays), act.n_layer) for m in (b, n)]
    return _combine(method, opts, *sums)[0]


def score(act: Activations, method: str, **opts: Any) -> np.ndarray:
    """Scores [n_layer, n_expert] of one method (see ALL_METHODS); log_odds takes alpha (default 0.5)."""
    opts = _method_options(method, opts)
    return _point(act, method, opts, _inputs(act, method))


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
    se: np.ndarray | None = None  # bootstrap standard errors [n_layer, n_expert]
    band_crit: float | None = None  # the sup-t critical value c of the simultaneous band score ± c·se

    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) [n_layer, n_expert]: the simultaneous band at ``level``, score ± c·se (see the module)."""
        if self.se is None or self.band_crit is None:
            raise ValueError(
                "this fTRI result has no simultaneous band (written before it existed): re-run fTRI, "
                "or use the per-expert intervals"
            )
        half = self.band_crit * self.se
        return self.scores - half, self.scores + half

    def ranked(
        self,
        n: int | None = None,
        sign: str | None = None,
        per_layer_cap: int | None = None,
        layers: Iterable[int] | None = None,
        only: np.ndarray | None = None,
    ) -> list[RankedExpert]:
        """Experts ordered by score (sign "positive"), -score ("negative") or |score| ("abs"), ties by
        (layer, expert); at most per_layer_cap per layer, only the given layers (and, with ``only``, a boolean
        [n_layer, n_expert] mask, the experts it marks), the first n."""
        n_layer, n_expert = self.scores.shape
        key = _sign_key(self.scores, self.sign if sign is None else sign).ravel()
        flat = np.arange(key.size)
        order = np.lexsort((flat, -key))
        if only is not None:
            only = np.asarray(only, dtype=bool)
            if only.shape != self.scores.shape:
                raise ValueError(f"only has shape {only.shape}, expected {self.scores.shape}")
            order = order[only.ravel()[order]]
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
            out.append(
                RankedExpert(
                    layer,
                    expert,
                    float(self.scores[layer, expert]),
                    float(self.ci_low[layer, expert]),
                    float(self.ci_high[layer, expert]),
                    float(self.stability[layer, expert]),
                )
            )
        return out

    def qualified(self, sign: str | None = None, threshold: float = 0.0, evidence: str = "simultaneous") -> np.ndarray:
        """[n_layer, n_expert] booleans: the experts with evidence for the sign. Sign "positive": a score > 0
        whose interval lies wholly above ``threshold`` (0: the interval excludes 0); "negative": a score < 0
        whose interval lies wholly below -threshold; "abs": either. The interval is the simultaneous band
        (``evidence="simultaneous"``) or the expert's own percentile interval (``"per-expert"``). A result of
        fewer than MIN_BOOT_EVIDENCE replicates qualifies no expert."""
        sign = self.sign if sign is None else sign
        _check_sign(sign)
        threshold = float(threshold)
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        if evidence not in EVIDENCE:
            raise ValueError(f"unknown evidence {evidence!r}; choose one of {', '.join(EVIDENCE)}")
        low, high = self.band() if evidence == "simultaneous" else (self.ci_low, self.ci_high)
        if self.n_boot < MIN_BOOT_EVIDENCE:
            return np.zeros(self.scores.shape, dtype=bool)
        up = (self.scores > 0) & (low > threshold)
        down = (self.scores < 0) & (high < -threshold)
        return up if sign == "positive" else down if sign == "negative" else up | down

    def evidence(
        self,
        n: int | None = None,
        sign: str | None = None,
        threshold: float = 0.0,
        per_layer_cap: int | None = None,
        layers: Iterable[int] | None = None,
        evidence: str = "simultaneous",
    ) -> tuple[list[RankedExpert], int]:
        """(the qualified experts in rank order, at most n and per_layer_cap per layer; how many qualified in
        the given layers before any cap). See :meth:`qualified`."""
        mask = self.qualified(sign, threshold, evidence)
        if layers is not None:
            keep = np.zeros_like(mask)
            keep[sorted(set(int(l) for l in layers) & set(range(mask.shape[0])))] = True
            mask = mask & keep
        return self.ranked(n, sign, per_layer_cap, layers, only=mask), int(mask.sum())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; from_dict restores it."""
        return {
            "method": self.method,
            "top_n": int(self.top_n),
            "sign": self.sign,
            "n_behavior": int(self.n_behavior),
            "n_baseline": int(self.n_baseline),
            "level": float(self.level),
            "n_boot": int(self.n_boot),
            "options": dict(self.options),
            **{k: np.asarray(getattr(self, k), dtype=np.float64).tolist() for k in _ARRAYS},
            **(
                {}
                if self.se is None
                else {"se": np.asarray(self.se, dtype=np.float64).tolist(), "band_crit": float(self.band_crit or 0.0)}
            ),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FtriResult:
        missing = [k for k in (*_ARRAYS, "method", "top_n", "sign", "n_behavior", "n_baseline") if k not in data]
        if missing:
            raise ValueError(f"fTRI result is missing {', '.join(missing)}; was it written by FtriResult.to_dict?")
        if data["method"] not in ALL_METHODS:
            raise ValueError(f"fTRI result has unknown method {data['method']!r}; known: {', '.join(ALL_METHODS)}")
        _check_sign(data["sign"])
        arrays: dict[str, Any] = {k: np.asarray(data[k], dtype=np.float64) for k in _ARRAYS}
        band: dict[str, Any] = {}
        if data.get("se") is not None:  # results written before the band existed have none
            arrays["se"] = np.asarray(data["se"], dtype=np.float64)
            band["band_crit"] = float(data["band_crit"])
        shape = arrays["scores"].shape
        if len(shape) != 2 or any(a.shape != shape for a in arrays.values()):
            shapes = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
            raise ValueError(f"fTRI result arrays must share one [n_layer, n_expert] shape, got {shapes}")
        return cls(
            method=data["method"],
            top_n=int(data["top_n"]),
            sign=data["sign"],
            n_behavior=int(data["n_behavior"]),
            n_baseline=int(data["n_baseline"]),
            level=float(data.get("level", 0.95)),
            n_boot=int(data.get("n_boot", 200)),
            options=dict(data.get("options", {})),
            **arrays,
            **band,
        )


_ARRAYS = ("scores", "ci_low", "ci_high", "stability")


def analyse(
    act: Activations,
    method: str,
    *,
    n_boot: int = 200,
    level: float = 0.95,
    top_n: int = 10,
    sign: str = "positive",
    seed: int = 0,
    **opts: Any,
) -> FtriResult:
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
    arrays = _inputs(act, method)
    scores = _point(act, method, opts, arrays)
    b, n = act.is_behavior, ~act.is_behavior
    arrays_b, arrays_n = tuple(a[b] for a in arrays), tuple(a[n] for a in arrays)
    rng = np.random.default_rng(seed)
    wb, wn = (_resample_weights(rng, act.n_behavior, n_boot), _resample_weights(rng, act.n_baseline, n_boot))
    cells = act.n_layer * act.n_expert
    boot = np.empty((n_boot, cells))
    block = max(1, _BLOCK_CELLS // cells)
    for start in range(0, n_boot, block):
        rows = slice(start, start + block)
        sums_b = _class_sums(wb[rows], arrays_b, act.n_layer)
        sums_n = _class_sums(wn[rows], arrays_n, act.n_layer)
        boot[rows] = _combine(method, opts, sums_b, sums_n).reshape(-1, cells)
    tail = (1.0 - level) / 2.0
    ci_low, ci_high = np.quantile(boot, [tail, 1.0 - tail], axis=0)
    se, crit = _sup_t(boot, scores.ravel(), level)
    crit = _t_equivalent(crit, min(act.n_behavior, act.n_baseline) - 1)
    shape = scores.shape
    return FtriResult(
        method=method,
        scores=scores,
        ci_low=ci_low.reshape(shape),
        ci_high=ci_high.reshape(shape),
        stability=_top_membership(boot, sign, top_n).reshape(shape),
        top_n=int(top_n),
        sign=sign,
        n_behavior=act.n_behavior,
        n_baseline=act.n_baseline,
        level=float(level),
        n_boot=int(n_boot),
        options=opts,
        se=se.reshape(shape),
        band_crit=crit,
    )


def _sup_t(boot: np.ndarray, point: np.ndarray, level: float) -> tuple[np.ndarray, float]:
    """(bootstrap standard errors [cells], the sup-t critical value): the ``level`` quantile over replicates
    of max over cells of |replicate - point| / se. Cells whose replicates do not vary (never-firing experts, one
    prompt per class) have se 0 and take no part; the value is 0 when no cell varies."""
    se = boot.std(axis=0)
    scale = max(float(np.abs(boot).max(initial=0.0)), float(np.abs(point).max(initial=0.0)))
    varies = se > 1e-9 * scale  # float noise in sums of weights is not variation
    se = np.where(varies, se, 0.0)
    if not varies.any():
        return se, 0.0
    t = (np.abs(boot[:, varies] - point[varies]) / se[varies]).max(axis=1)
    return se, float(np.quantile(t, level))


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| > t) for Student's t with an integer df >= 1 (Abramowitz & Stegun 26.7.3-4, finite sums)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term = total = 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return max(0.0, 1.0 - inside)


def _t_equivalent(z: float, df: int) -> float:
    """The t (df degrees of freedom) with the two-sided tail of the standard normal's z: a normal-scale
    critical value widened for standard errors estimated from df + 1 prompts. z itself when df < 1 or large."""
    if z <= 0 or df < 1 or df > 2000:
        return z
    tail = math.erfc(z / math.sqrt(2))
    lo, hi = z, z
    while _t_two_sided(hi, df) > tail:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided(mid, df) > tail else (lo, mid)
    return hi
