"""Statistics for paired A/B comparisons of lcx attention methods on the same prompts.

* ``mcnemar`` / ``mcnemar_from_counts`` - is arm B right more often than arm A on paired
  pass/fail outcomes?
* ``paired_bootstrap_diff`` - bootstrap confidence interval of ``mean(b) - mean(a)`` for paired
  scores (e.g. partial-credit task scores).
* ``wilson_interval`` - confidence interval of one arm's success rate.
* ``percentile_with_ci`` - a latency percentile with a bootstrap confidence interval.

Bootstraps use ``numpy.random.default_rng(seed)`` and are deterministic per seed; resamples are
drawn in chunks so memory stays small for long inputs.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

EXACT_BELOW = 25  # discordant pairs below this use the exact binomial test
_CHUNK_ELEMENTS = 1 << 21  # resampled values held in memory at once


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    return float(level)


def _check_n_boot(n_boot: int) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} must be a positive integer")
    return n_boot


def _as_bools(name: str, values: Sequence[bool]) -> list[bool]:
    """``values`` as a list of bools; accepts bool-likes equal to 0 or 1 (e.g. numpy.bool_)."""
    out = []
    for i, v in enumerate(values):
        if v not in (0, 1):  # True == 1, False == 0
            raise ValueError(f"{name}[{i}]={v!r} is not a boolean outcome")
        out.append(bool(v))
    return out


def _as_floats(name: str, values: Sequence[float]) -> np.ndarray:
    """``values`` as a 1-D float array of finite numbers (shape ``(n,)``, ``n >= 1``)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = arr[~np.isfinite(arr)][0]
        raise ValueError(f"{name} contains a non-finite value {bad!r}")
    return arr


def _check_same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired sequences differ in length: len(a)={len(a)}, len(b)={len(b)}")


def _exact_two_sided_p(k: int, n: int) -> float:
    """Two-sided binomial(n, 1/2) p-value of a count as extreme as ``k``."""
    low = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def chi2_1_sf(x: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2.0))


def mcnemar_from_counts(n01: int, n10: int, correction: bool = True) -> dict:
    """McNemar test from discordant counts: ``n01`` = A wrong and B right, ``n10`` = A right and
    B wrong.

    With ``n01 + n10 < EXACT_BELOW`` the exact two-sided binomial test is used (``method="exact"``,
    ``statistic = min(n01, n10)``); otherwise the chi-square test with one degree of freedom
    (``method="chi2"``, ``statistic = (|n01 - n10| - 1)^2 / (n01 + n10)`` with continuity
    correction, clamped at 0, or ``(n01 - n10)^2 / (n01 + n10)`` without). No discordant pairs
    gives ``p_value = 1.0``.
    """
    for name, v in (("n01", n01), ("n10", n10)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r} must be a non-negative integer")
    n = n01 + n10
    if n < EXACT_BELOW:
        p = 1.0 if n == 0 else _exact_two_sided_p(n01, n)
        return {"n01": n01, "n10": n10, "statistic": float(min(n01, n10)), "p_value": p, "method": "exact"}
    diff = abs(n01 - n10)
    if correction:
        diff = max(diff - 1, 0)
    statistic = diff * diff / n
    return {"n01": n01, "n10": n10, "statistic": statistic, "p_value": chi2_1_sf(statistic), "method": "chi2"}


def mcnemar(a: Sequence[bool], b: Sequence[bool], correction: bool = True) -> dict:
    """McNemar test for paired correctness of arms A and B on the same prompts.

    ``a[i]`` / ``b[i]`` tell whether arm A / B got prompt ``i`` right. Returns
    ``{"n01", "n10", "statistic", "p_value", "method"}`` as ``mcnemar_from_counts``.
    """
    _check_same_length(a, b)
    a_ok, b_ok = _as_bools("a", a), _as_bools("b", b)
    n01 = sum(1 for x, y in zip(a_ok, b_ok) if not x and y)
    n10 = sum(1 for x, y in zip(a_ok, b_ok) if x and not y)
    return mcnemar_from_counts(n01, n10, correction=correction)


def _bootstrap(values: np.ndarray, stat, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` values of ``stat(resamples)``, where ``resamples`` has shape ``(rows, n)``
    and ``stat`` reduces along axis 1. Returns shape ``(n_boot,)``."""
    rng = np.random.default_rng(seed)
    n = values.size
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = stat(values[idx])
    return out


def _interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates at confidence ``level``."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict:
    """Paired bootstrap of ``mean(b) - mean(a)``: prompts are resampled with replacement,
    keeping each prompt's two scores together. Returns ``{"diff", "low", "high"}`` with a
    percentile interval at confidence ``level``."""
    _check_same_length(a, b)
    d = _as_floats("b", b) - _as_floats("a", a)
    boot = _bootstrap(d, lambda m: m.mean(axis=1), _check_n_boot(n_boot), seed)
    low, high = _interval(boot, _check_level(level))
    return {"diff": float(d.mean()), "low": low, "high": high}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a success rate ``successes / n``."""
    for name, v in (("successes", successes), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}={v!r} must be an integer")
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be in [0, n={n}]")
    z = NormalDist().inv_cdf(0.5 + _check_level(level) / 2.0)
    p = successes / n
    z2n = z * z / n
    center = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the edges
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def percentile_with_ci(values: Sequence[float], q: float, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """The ``q``-th percentile (``q`` in [0, 100], linear interpolation) of ``values`` with a
    bootstrap percentile interval. Returns ``{"value", "low", "high"}``."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q={q!r} must be in [0, 100]")
    arr = _as_floats("values", values)
    boot = _bootstrap(arr, lambda m: np.percentile(m, q, axis=1), _check_n_boot(n_boot), seed)
    low, high = _interval(boot, _check_level(level))
    return {"value": float(np.percentile(arr, q)), "low": low, "high": high}
