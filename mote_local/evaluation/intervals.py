"""Confidence intervals for behaviour rates and their differences, matched to how the evaluation is designed.

Every condition generates one response per prompt, and the conditions share their prompts. So:

* one condition's rate (one response per prompt): Wilson score interval (:func:`wilson_interval`);
* a pooled rate over several responses per prompt (the random control: one response per seed): responses of
  one prompt are not independent (greedy decoding under two random profiles often says the same thing), so the
  interval is the Wilson interval at the Kish effective sample size n / deff, deff estimated from the spread of
  the per-prompt rates (:func:`clustered_rate_interval`);
* a condition against ``unsteered`` on the same prompts: a paired interval on the per-prompt differences,
  Bonett & Price's adjusted Wald interval (2012; one pseudo-prompt at +1 and one at -1), which for one response
  per prompt is their interval for paired binary outcomes and for several (the pooled control) the same
  interval on the prompts' mean differences (:func:`paired_difference_interval`).

:func:`newcombe_interval` (two independent samples) is kept for comparisons of unrelated prompt sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(hits: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion hits/n; (0, 1) when n is 0. hits and n may be fractional (an
    effective sample size)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be in 0..{n}, got {hits}")
    p = hits / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # at 0 and n the interval ends at the observed proportion exactly; rounding must not move it
    return (0.0 if hits == 0 else lo), (1.0 if hits == n else hi)


def newcombe_interval(hits1: int, n1: int, hits2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for p1 - p2 of two independent samples, from the Wilson
    intervals of both."""
    p1, p2 = hits1 / n1, hits2 / n2
    l1, u1 = wilson_interval(hits1, n1, z)
    l2, u2 = wilson_interval(hits2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, lo), min(1.0, hi)


def clustered_rate_interval(
    hits: Sequence[float], n: Sequence[float], z: float = Z95
) -> tuple[float, tuple[float, float], float]:
    """(rate, Wilson interval at the effective sample size, design effect) of a rate pooled over prompts that
    each contributed ``n[p]`` responses with ``hits[p]`` hits.

    The design effect is the variance of the pooled rate estimated between prompts (the ratio estimator's
    linearised variance, prompts as clusters) over the binomial variance that treats every response as
    independent, kept within [1, the largest responses per prompt]: never narrower than the naive interval, never
    wider than counting each prompt once. With one response per prompt it is 1 and the interval is Wilson's.
    """
    h = np.asarray(hits, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    if h.shape != m.shape or h.ndim != 1:
        raise ValueError("hits and n must be two sequences of the same length, one value per prompt")
    keep = m > 0
    h, m = h[keep], m[keep]
    total, n_total = float(h.sum()), float(m.sum())
    if n_total == 0:
        return math.nan, (0.0, 1.0), 1.0
    rate = total / n_total
    k = len(m)
    deff = 1.0
    if k > 1 and 0 < rate < 1:
        mean_m = n_total / k
        # between-prompt variance of the ratio estimator, with the k / (k - 1) small-sample factor
        var_cluster = float(np.sum((h - rate * m) ** 2)) / (k * (k - 1) * mean_m**2)
        var_binomial = rate * (1 - rate) / n_total
        deff = var_cluster / var_binomial
    deff = min(max(deff, 1.0), float(m.max()))
    return rate, wilson_interval(total / deff, n_total / deff, z), deff


def paired_difference_interval(
    steered: Sequence[float], reference: Sequence[float], z: float = Z95
) -> tuple[float, tuple[float, float]]:
    """(mean difference, interval) of per-prompt values ``steered[p] - reference[p]`` on the same prompts; each
    value is a prompt's rate in [0, 1] (0 or 1 for one response, a share of seeds for a pooled control).

    The interval is Bonett & Price's adjusted Wald interval: one pseudo-prompt with difference +1 and one with
    -1 join the n prompts, and the interval is the mean ± z · sd / sqrt(n + 2) of those n + 2 differences (sd
    with divisor n + 2), clipped to [-1, 1]. For binary outcomes this is exactly Bonett & Price (2012); the
    pseudo-prompts keep the interval from collapsing to a point when every pair agrees.
    """
    a = np.asarray(steered, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("steered and reference must be two sequences of the same length, one value per prompt")
    n = len(a)
    if n == 0:
        return math.nan, (-1.0, 1.0)
    d = a - b
    adj = np.concatenate([d, [1.0, -1.0]])
    centre = float(adj.mean())
    sd = math.sqrt(max(0.0, float(np.mean(adj * adj)) - centre * centre))
    half = z * sd / math.sqrt(n + 2)
    return float(d.mean()), (max(-1.0, centre - half), min(1.0, centre + half))
