"""TokenSelect in the real engine: dense when the budget covers the context, the float32 reference's
selection at decode (teacher-forced), and a selection cache that is used and counted. (Batched
against alone, preemption, chunked prefill and prefix caching: tests/reliability.)"""
import pytest

from .conftest import TOKEN_SELECT, gap, whole, within
from .reference_model import token_logprobs

pytestmark = pytest.mark.slow


def test_a_budget_covering_the_context_is_token_identical_to_dense(arm):
    stock, _ = arm("stock")
    wide, log = arm("token_select_wide")
    assert "lcx attention active: method=token_select" in log, log[-3000:]
    assert wide["token_ids"] == stock["token_ids"]
    assert wide["prompt_logprobs"] == stock["prompt_logprobs"]


def test_decode_matches_the_reference_selection_teacher_forced(arm, model_path, stock_yardstick_f32):
    """Eight requests, three at a time; every decode step after the first selects 192 of up to
    1,300 tokens (plus sinks and window).
    The engine's log-probabilities of its own tokens are compared with the float32 reference model
    that selects the same way at those rows; a kernel that read the wrong tokens, or every token,
    lands far from it (checked against the dense reference on the longest prompt)."""
    lcx, _ = arm("token_select")
    sel = TOKEN_SELECT
    spec = {"sink": sel["sink"], "window": sel["window"], "k": lambda n: sel["budget"]}
    decode = []
    for i, ids in enumerate(lcx["prompt_token_ids"]):
        full = ids + lcx["token_ids"][i]
        ref = token_logprobs(model_path, full, select={**spec, "from": len(ids)})
        decode.append(gap(lcx["logprobs"][i][1:], ref[len(ids):]))  # the first token comes from the dense prefill
    yard = whole(stock_yardstick_f32)
    assert within(whole(decode), yard), (decode, yard)
    ids = lcx["prompt_token_ids"][-1]
    dense = token_logprobs(model_path, ids + lcx["token_ids"][-1])
    assert gap(lcx["logprobs"][-1][1:], dense[len(ids):])["mean"] > decode[-1]["mean"], "selection made no difference"


def test_without_reuse_the_selection_cache_never_hits(arm):
    """``reuse_similarity: null``: every decode step selects afresh. (With reuse on, the cache is
    used and counted under batching, chunking and preemption: tests/reliability.)"""
    plain, _ = arm("token_select")
    assert plain["lcx_counters"]["selection_lookups"] > 0
    assert plain["lcx_counters"].get("selection_hits", 0) == 0
