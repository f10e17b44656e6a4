"""TokenSelect in the real engine: dense when the budget covers the context, the float32 reference's
selection at decode (teacher-forced), batch-invariant, and a selection cache that stays with its
request while requests join and leave the batch."""
import pytest

from .conftest import SELECT_PROMPTS, TOKEN_SELECT, gap, whole, within
from .reference_model import token_logprobs

pytestmark = pytest.mark.slow


def test_a_budget_covering_the_context_is_token_identical_to_dense(arm):
    stock, _ = arm("stock")
    wide, log = arm("token_select_wide")
    assert "lcx attention active: method=token_select" in log, log[-3000:]
    assert wide["token_ids"] == stock["token_ids"]
    assert wide["prompt_logprobs"] == stock["prompt_logprobs"]


def test_decode_matches_the_reference_selection_teacher_forced(arm, model_path, stock_yardstick):
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
    yard = whole(stock_yardstick)
    assert within(whole(decode), yard), (decode, yard)
    ids = lcx["prompt_token_ids"][-1]
    dense = token_logprobs(model_path, ids + lcx["token_ids"][-1])
    assert gap(lcx["logprobs"][-1][1:], dense[len(ids):])["mean"] > decode[-1]["mean"], "selection made no difference"


def test_eight_requests_in_a_batch_get_what_each_gets_alone(arm, stock_yardstick):
    """Eight requests of different lengths, at most three running, the selection cache on: rows
    are reused as requests finish and join, so per-request state (the cached selection) that
    followed a row instead of its request would leak. (Without the cache, the reference test above
    checks the batched token variant against each request's own float32 selection.)
    Compared teacher-forced with each request run alone in the same engine (the engine's own
    matrix products round bf16 differently in a batch), within twice stock's own distance to the
    float32 reference; a leaked selection would be off by nats."""
    lcx, _ = arm("token_select_cached")
    assert len(lcx["prompt_token_ids"]) == len(SELECT_PROMPTS) == 8
    yard = whole(stock_yardstick)
    limit = {"mean": 2 * yard["mean"] + 0.02, "p99": 2 * yard["p99"] + 0.1}
    compared = 0
    for i in range(len(SELECT_PROMPTS)):
        if lcx["token_ids"][i] != lcx["alone"]["token_ids"][i]:
            continue  # a bf16 near-tie flipped a token: the continuations are no longer comparable
        d = gap(lcx["logprobs"][i], lcx["alone"]["logprobs"][i])
        assert d["mean"] <= limit["mean"] and d["p99"] <= limit["p99"], (i, d, limit)
        compared += 1
    assert compared >= 6, compared


def test_the_selection_cache_is_used_and_counted(arm):
    cached, log = arm("token_select_cached")
    assert "lcx attention active: method=token_select" in log, log[-2000:]
    counters = cached["lcx_counters"]
    assert counters["selection_lookups"] > 0
    rate = counters.get("selection_hits", 0) / counters["selection_lookups"]
    assert 0.0 < rate < 1.0, counters
    plain, _ = arm("token_select")
    assert plain["lcx_counters"].get("selection_hits", 0) == 0  # reuse_similarity null: never reused

