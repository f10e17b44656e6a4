"""Where lcx's arithmetic differs from stock (its own kernels, or a selection), the real engine's
teacher-forced log-probabilities are compared with the float32 reference model restricted the same
way, within the stock engine's own distance to the dense reference (see conftest.within)."""
import pytest

from .conftest import PASS_KEYS, STREAMING, gap, whole, within
from .reference_model import token_logprobs

pytestmark = pytest.mark.slow


def test_torch_twin_serves_the_real_engine_teacher_forced(arm, model_path, stock_yardstick):
    twin, log = arm("twin")
    assert "lcx attention active: method=dense kernel=torch" in log, log[-3000:]
    got = [gap(lp[1:], token_logprobs(model_path, ids)) for ids, lp in zip(twin["prompt_token_ids"], twin["prompt_logprobs"])]
    assert within(whole(got), whole(stock_yardstick)), (got, stock_yardstick)
    stock, _ = arm("stock")  # the pass keys found exactly where stock on this machine finds them
    for key, text, stock_text in zip(PASS_KEYS, twin["texts"][-2:], stock["texts"][-2:]):
        assert (key in text) == (key in stock_text), (key, text, stock_text)


def test_triton_kernel_serves_the_real_engine_interpreted(arm, model_path, stock_yardstick):
    assert __import__("os").environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py
    triton, log = arm("triton")
    assert "lcx attention active: method=dense kernel=triton" in log, log[-3000:]
    got = [gap(lp[1:], token_logprobs(model_path, ids)) for ids, lp in zip(triton["prompt_token_ids"], triton["prompt_logprobs"])]
    assert within(whole(got), whole(stock_yardstick[:2])), (got, stock_yardstick[:2])


def test_streaming_matches_the_windowed_reference_in_prefill_and_decode(arm, model_path, stock_yardstick):
    """Chunked prefill and decode through selector -> layer core -> kernels, against the reference
    model with exactly the same sinks + window per query. Long prompts are far outside the window,
    so a kernel that attended densely (or to the wrong tokens) lands far from the reference."""
    lcx, log = arm("streaming")
    assert "lcx attention active: method=streaming kernel=engine" in log, log[-3000:]
    sink, window = STREAMING["sink"], STREAMING["window"]
    prefill, decode = [], []
    for i, ids in enumerate(lcx["prompt_token_ids"]):
        full = ids + lcx["token_ids"][i]
        ref = token_logprobs(model_path, full, sink, window)
        prefill.append(gap(lcx["prompt_logprobs"][i][1:], ref[: len(ids) - 1]))
        decode.append(gap(lcx["logprobs"][i], ref[len(ids) - 1:]))
        if len(ids) > sink + window + 200:  # the window really cuts: the dense reference is far away
            dense_ref = token_logprobs(model_path, ids)
            assert gap(lcx["prompt_logprobs"][i][1:], dense_ref)["mean"] > 5 * prefill[-1]["mean"] + 0.02, i
    yard = whole(stock_yardstick)
    assert within(whole(prefill), yard), (prefill, yard)
    assert within(whole(decode), yard), (decode, yard)
