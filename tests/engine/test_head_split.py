"""``head_split`` in the real engine: streaming heads stored apart (only sinks + window), retrieval
heads in the engine's own cache. Teacher-forced against the float32 reference model restricted
exactly the same way (per KV head), within the stock engine's own distance to the dense reference;
the engine's reported KV capacity. (Batched against alone, preemption, chunked prefill and prefix
caching: tests/reliability.)"""
import pytest
import torch

from lcx_plugin import selectors
from lcx_plugin.head_patterns import ModelShape

from .conftest import HEAD_SPLIT, gap, whole, within
from .reference_model import token_logprobs
from .test_dense_identity import _identical

pytestmark = pytest.mark.slow

SMOLLM2 = ModelShape(30, 3, 64, "SmolLM2-135M-Instruct")


def _mask() -> torch.Tensor:
    params = {k: v for k, v in HEAD_SPLIT.items() if k != "method"}
    return selectors.get("head_split")(**params).streaming_mask(SMOLLM2)


def _against_reference(result, model_path):
    sink, window, mask = HEAD_SPLIT["sink"], HEAD_SPLIT["window"], _mask()
    prefill, decode = [], []
    for i, ids in enumerate(result["prompt_token_ids"]):
        ref = token_logprobs(model_path, ids + result["token_ids"][i], sink, window, streaming=mask)
        prefill.append(gap(result["prompt_logprobs"][i][1:], ref[: len(ids) - 1]))
        decode.append(gap(result["logprobs"][i], ref[len(ids) - 1:]))
    return prefill, decode


def test_head_split_matches_the_split_reference_in_prefill_and_decode(arm, model_path, stock_yardstick):
    """Prefill and decode: every layer's two streaming KV heads see sinks + window, its retrieval
    head everything. A long prompt far outside the window tells the split from dense and from
    all-heads streaming. (Chunked prefill, preemption and prefix caching against this whole-prefill
    run: the reliability matrix, tests/reliability.)"""
    result, log = arm("head_split")
    assert "lcx attention active: method=head_split kernel=engine" in log, log[-3000:]
    prefill, decode = _against_reference(result, model_path)
    yard = whole(stock_yardstick)
    assert within(whole(prefill), yard), (prefill, yard)
    assert within(whole(decode), yard), (decode, yard)
    long_ids = result["prompt_token_ids"][-2]  # the 2,000-token prompt (both arms end with the long ones)
    assert len(long_ids) > 1800
    for other in (token_logprobs(model_path, long_ids), token_logprobs(model_path, long_ids, 16, 256)):
        # dense, and every head streaming: both far from what the split engine computed
        assert gap(result["prompt_logprobs"][-2][1:], other)["mean"] > 3 * prefill[-2]["mean"] + 0.01


def test_streaming_heads_stored_apart_raise_the_engines_kv_capacity(arm):
    """Same memory, default max_num_batched_tokens: with 2 of 3 KV heads streaming, the capacity the
    engine itself reports grows by at least 2.5x (1/3 of the bytes per token, plus each request's
    sinks and window, counted at their peak)."""
    stock, _ = arm("stock")
    split, log = arm("head_split")
    ratio = split["kv_capacity"]["tokens"] / stock["kv_capacity"]["tokens"]
    assert ratio >= 2.5, (split["kv_capacity"], stock["kv_capacity"])
    assert split["kv_capacity"]["tokens_bf16"] / stock["kv_capacity"]["tokens_bf16"] >= 2.5


def test_head_split_with_a_window_covering_every_prompt_is_identical_to_stock(arm):
    stock, _ = arm("stock")
    wide, log = arm("head_split_wide")
    assert "lcx attention active: method=head_split kernel=engine" in log, log[-3000:]
    _identical(stock, wide)


@pytest.mark.parametrize("pattern, message", [
    ("/nonexistent/pattern.json", "head pattern /nonexistent/pattern.json: no such file"),
    ("TSV", "does not fit the served model"),
])
def test_a_bad_pattern_stops_the_engine_at_startup_with_one_clear_error(model_path, tmp_path, pattern, message):
    from lcx_plugin.harness.batch import ArmSpec, run_arm

    if pattern == "TSV":  # DuoAttention's layout, for a model with 2 layers x 3 KV heads
        pattern = str(tmp_path / "full_attention_heads.tsv")
        open(pattern, "w").write("0.1\t0.9\t0.2\n0.8\t0.05\t0.7\n")
    spec = ArmSpec(model=model_path, backend="lcx", lcx={**HEAD_SPLIT, "pattern": pattern}, prompts=["Hi"],
                   max_tokens=1)
    with pytest.raises(RuntimeError) as e:
        run_arm(spec, log_path=str(tmp_path / "engine.log"), timeout=600)
    assert message in str(e.value), str(e.value)[-3000:]
