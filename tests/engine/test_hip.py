"""HiP in the real engine: token-identical to stock when the budget covers every context; prefill and
decode teacher-forced against the float32 reference model that states HiP's selection; the search
counted. (Batched against alone, preemption, chunked prefill and prefix caching: tests/reliability.)"""
import pytest

from .conftest import HIP, PROMPTS, gap, whole, within
from .reference_model import token_logprobs

pytestmark = pytest.mark.slow

PAGE = 128  # the CPU engine's page size


def test_a_budget_covering_the_context_is_token_identical_to_stock(arm):
    stock, _ = arm("stock")
    wide, log = arm("hip_wide")
    assert "lcx attention active: method=hip" in log, log[-3000:]
    assert wide["token_ids"] == stock["token_ids"]
    assert wide["prompt_logprobs"] == stock["prompt_logprobs"]


def _reference(model_path, ids, generated):
    spec = {"sink": HIP["sink"], "window": HIP["window"], "k": HIP["budget"] // PAGE, "bs": PAGE,
            "qb": HIP["query_block"], "dense_layers": HIP["dense_layers"], "from": len(ids)}
    return token_logprobs(model_path, ids + generated, hip=spec)


def test_prefill_and_decode_match_the_reference_selection_teacher_forced(arm, model_path, stock_yardstick_f32):
    """Prompt log-probabilities (every prompt row under HiP's query-block selections) and decode
    log-probabilities (a fresh search each step) against the float32 model restricted the same
    way, within stock's own distance to the dense reference (stated slack in ``within``); a kernel
    that read the wrong pages, or every page, lands far from it (checked against the dense
    reference on the longest prompt)."""
    lcx, _ = arm("hip")
    gaps = []
    for i, ids in enumerate(lcx["prompt_token_ids"]):
        ref = _reference(model_path, ids, lcx["token_ids"][i])
        got = lcx["prompt_logprobs"][i][1:] + lcx["logprobs"][i]
        gaps.append(gap(got, ref))
    yard = whole(stock_yardstick_f32)
    assert within(whole(gaps), yard), (gaps, yard)
    longest = max(range(len(PROMPTS)), key=lambda i: len(lcx["prompt_token_ids"][i]))
    ids = lcx["prompt_token_ids"][longest]
    dense = token_logprobs(model_path, ids + lcx["token_ids"][longest])
    got = lcx["prompt_logprobs"][longest][1:] + lcx["logprobs"][longest]
    assert gap(got, dense)["mean"] > gaps[longest]["mean"], "the selection made no difference"


def test_the_search_runs_and_attends_to_a_fraction(arm):
    lcx, log = arm("hip")
    assert "lcx attention active: method=hip" in log, log[-2000:]
    c = lcx["lcx_counters"]
    assert c["hip_searches"] > 0 and c.get("hip_reuses", 0) == 0, c  # refresh_every=1: a search every step
    assert 0 < c["hip_pages_attended"] < c["hip_pages_held"], c
