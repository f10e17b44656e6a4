"""Paired A/B statistics against textbook values."""
from __future__ import annotations

import math

import pytest

from lcx_plugin.harness.ab.stats import (
    mcnemar,
    mcnemar_from_counts,
    paired_bootstrap_diff,
    percentile_with_ci,
    wilson_interval,
)


def _pairs(n11: int, n10: int, n01: int, n00: int) -> tuple[list[bool], list[bool]]:
    """Paired outcomes from a 2x2 table: ``nXY`` = A is X, B is Y (1 = right)."""
    cells = [(True, True)] * n11 + [(True, False)] * n10 + [(False, True)] * n01 + [(False, False)] * n00
    return [a for a, _ in cells], [b for _, b in cells]


# Agresti's presidential approval table: 794 approve twice, 150 approve then disapprove,
# 86 disapprove then approve, 570 disapprove twice.
AGRESTI = _pairs(794, 150, 86, 570)


def test_mcnemar_agresti_uncorrected():
    result = mcnemar(*AGRESTI, correction=False)
    assert (result["n01"], result["n10"]) == (86, 150)
    assert result["method"] == "chi2"
    assert result["statistic"] == pytest.approx(64**2 / 236)
    assert round(result["statistic"], 2) == 17.36
    assert result["p_value"] < 0.001


def test_mcnemar_agresti_corrected_is_the_default():
    result = mcnemar(*AGRESTI)
    assert result["statistic"] == pytest.approx(63**2 / 236)
    assert round(result["statistic"], 2) == 16.82
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(63**2 / 236 / 2)))
    assert result["p_value"] < 0.001


def test_mcnemar_exact_small_case():
    a, b = _pairs(3, 6, 1, 2)
    result = mcnemar(a, b)
    assert (result["n01"], result["n10"], result["method"]) == (1, 6, "exact")
    expected = 2 * (math.comb(7, 0) + math.comb(7, 1)) / 2**7
    assert expected == 0.125
    assert result["p_value"] == pytest.approx(expected)
    assert mcnemar(b, a)["p_value"] == pytest.approx(expected)  # symmetric


def test_mcnemar_switches_to_chi2_at_25_discordant_pairs():
    assert mcnemar_from_counts(12, 12)["method"] == "exact"
    assert mcnemar_from_counts(12, 13)["method"] == "chi2"


def test_mcnemar_no_discordant_pairs():
    result = mcnemar([True, False, True], [True, False, True])
    assert result["p_value"] == 1.0 and result["n01"] == result["n10"] == 0
    assert mcnemar([], [])["p_value"] == 1.0


def test_mcnemar_validates_input():
    with pytest.raises(ValueError, match=r"len\(a\)=2, len\(b\)=3"):
        mcnemar([True, False], [True, False, True])
    with pytest.raises(ValueError, match=r"b\[1\]=0.5"):
        mcnemar([True, False], [True, 0.5])
    with pytest.raises(ValueError, match="n01=-1"):
        mcnemar_from_counts(-1, 3)


def test_wilson_known_case():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490, abs=1e-3)
    assert high == pytest.approx(0.943, abs=1e-3)


def test_wilson_edges_and_validation():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.0 < high < 0.35
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.65 < low < 1.0
    with pytest.raises(ValueError, match="successes=11"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="level=1.5"):
        wilson_interval(1, 2, level=1.5)


A_SCORES = [0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0] * 3
B_SCORES = [1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0] * 3


def test_paired_bootstrap_diff_deterministic_and_brackets():
    first = paired_bootstrap_diff(A_SCORES, B_SCORES, n_boot=500, seed=3)
    assert first == paired_bootstrap_diff(A_SCORES, B_SCORES, n_boot=500, seed=3)
    assert first != paired_bootstrap_diff(A_SCORES, B_SCORES, n_boot=500, seed=4)
    expected = sum(B_SCORES) / len(B_SCORES) - sum(A_SCORES) / len(A_SCORES)
    assert first["diff"] == pytest.approx(expected)
    assert first["low"] <= first["diff"] <= first["high"]
    assert first["low"] > 0.0  # B is better on every discordant prompt


def test_paired_bootstrap_diff_validates_input():
    with pytest.raises(ValueError, match="len"):
        paired_bootstrap_diff([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="n_boot=0"):
        paired_bootstrap_diff([1.0], [1.0], n_boot=0)


LATENCIES = [10.0 + (i * 37 % 23) * 0.5 for i in range(200)]


@pytest.mark.parametrize("q", [50.0, 95.0])
def test_percentile_with_ci_deterministic_and_brackets(q):
    first = percentile_with_ci(LATENCIES, q, n_boot=300, seed=1)
    assert first == percentile_with_ci(LATENCIES, q, n_boot=300, seed=1)
    assert first["low"] <= first["value"] <= first["high"]
    assert first["high"] - first["low"] < 5.0


def test_percentile_with_ci_validates_q():
    with pytest.raises(ValueError, match="q=101"):
        percentile_with_ci([1.0, 2.0], 101)
    with pytest.raises(ValueError, match="non-empty"):
        percentile_with_ci([], 50)
