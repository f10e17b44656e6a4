"""Where lcx runs the engine's own arithmetic, it is token-identical to stock on the same machine:
dense lcx on the default CPU path (the engine's op, driven by lcx's layer core), and streaming whose
window covers every prompt (every sequence stays dense). Dense lcx under chunked prefill mixed with
decode steps, preemption, batching and the prefix cache equals stock exactly in the reliability
matrix (tests/reliability/test_matrix.py); split over ranks, in ``./lcx bench reliability``."""
import pytest

from .conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.slow


def _identical(stock, lcx):
    assert stock["prompt_tokens"] == lcx["prompt_tokens"]
    assert max(stock["prompt_tokens"]) >= 2000, stock["prompt_tokens"]
    assert all(len(t) == MAX_TOKENS for t in lcx["token_ids"])
    diffs = [i for i, (a, b) in enumerate(zip(stock["token_ids"], lcx["token_ids"])) if a != b]
    assert not diffs, "outputs differ: " + "; ".join(f"#{i}: stock {stock['texts'][i]!r} vs lcx {lcx['texts'][i]!r}"
                                                     for i in diffs)
    assert lcx["prompt_logprobs"] == stock["prompt_logprobs"], "teacher-forced log-probabilities differ"


def test_dense_lcx_is_token_identical_to_stock(arm):
    stock, _ = arm("stock")
    lcx, log = arm("dense")
    # The engine chose lcx, and lcx's own forward ran (its log line is written from forward()).
    assert "Using LCX backend on CPU" in log, log[-3000:]
    assert "lcx attention active: method=dense kernel=engine" in log, log[-3000:]
    assert "Using CPU_ATTN" not in log
    _identical(stock, lcx)


def test_streaming_with_a_window_covering_every_prompt_is_identical_to_stock(arm):
    stock, _ = arm("stock")
    wide, log = arm("streaming_wide")
    assert "lcx attention active: method=streaming kernel=engine" in log, log[-3000:]
    _identical(stock, wide)
    assert len(PROMPTS) == len(wide["texts"])
