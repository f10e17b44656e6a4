"""Dense lcx inside the real vLLM CPU engine on SmolLM2-135M: greedy output is token-identical
to the stock backend (both eager), over a mixed-length batch that includes a 3,000+ token
prompt, with and without chunked prefill."""
import pytest

from lcx_plugin.model import prepare
from lcx_plugin.prompts import SHORT_PROMPTS, long_prompt
from lcx_plugin.vllm_runner import ArmSpec, run_arm

pytestmark = pytest.mark.slow

PROMPTS = SHORT_PROMPTS + [long_prompt(3000, seed=1), long_prompt(1200, seed=2, key="5150")]
MAX_TOKENS = 24
# Small token budget per step: long prompts are split into chunks and scheduled together with
# the other requests' decode steps, which is the mixed prefill/decode path.
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 512}


def _run(tmp_path, name, engine, backend=None, lcx=None):
    log = tmp_path / f"{name}.log"
    spec = ArmSpec(model=str(prepare()), backend=backend, lcx=lcx, prompts=PROMPTS, max_tokens=MAX_TOKENS, engine=engine)
    return run_arm(spec, log_path=str(log)), log.read_text()


def _assert_identical(stock, lcx):
    assert stock["prompt_tokens"] == lcx["prompt_tokens"]
    assert max(stock["prompt_tokens"]) >= 3000, stock["prompt_tokens"]
    diffs = [i for i, (a, b) in enumerate(zip(stock["token_ids"], lcx["token_ids"])) if a != b]
    assert not diffs, "outputs differ for prompts " + "; ".join(
        f"#{i}: stock {stock['texts'][i]!r} vs lcx {lcx['texts'][i]!r}" for i in diffs)
    assert all(len(t) == MAX_TOKENS for t in lcx["token_ids"])


@pytest.mark.parametrize("engine", [{}, CHUNKED], ids=["whole_prefill", "chunked_prefill"])
def test_dense_lcx_is_token_identical_to_stock(tmp_path, engine):
    stock, _ = _run(tmp_path, "stock", engine)
    lcx, log = _run(tmp_path, "lcx", engine, backend="lcx", lcx={"method": "dense"})
    # The engine chose lcx, and lcx's own forward ran (its log line is written from forward()).
    assert "Using LCX backend on CPU" in log, log[-3000:]
    assert "lcx attention active: method=dense kernel=engine" in log, log[-3000:]
    assert "Using CPU_ATTN" not in log
    _assert_identical(stock, lcx)
