"""Dense lcx inside the real vLLM CPU engine on SmolLM2-135M, against the stock backend.

The default CPU path must be token-identical to stock (both eager) over a mixed-length batch
that includes a 3,000+ token prompt, with and without chunked prefill. lcx's own torch twin
runs in the same engine too; it computes the same attention with a different summation order,
so it may part from stock at a near-tie: it must agree on most prompts and still retrieve the
planted pass keys.
"""
import functools

import pytest

from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.prompts import SHORT_PROMPTS, long_prompt
from lcx_plugin.harness.batch import ArmSpec, run_arm

pytestmark = pytest.mark.slow

PASS_KEYS = ("7421", "5150")
PROMPTS = SHORT_PROMPTS + [long_prompt(3000, seed=1, key=PASS_KEYS[0]), long_prompt(1200, seed=2, key=PASS_KEYS[1])]
MAX_TOKENS = 24
# Small token budget per step: long prompts are split into chunks and scheduled together with
# the other requests' decode steps, which is the mixed prefill/decode path.
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 512}
ENGINES = {"whole_prefill": {}, "chunked_prefill": CHUNKED}


def _run(tmp_dir, name, engine, backend=None, lcx=None):
    log = tmp_dir / f"{name}.log"
    spec = ArmSpec(model=str(prepare()), backend=backend, lcx=lcx, prompts=PROMPTS, max_tokens=MAX_TOKENS, engine=engine)
    return run_arm(spec, log_path=str(log)), log.read_text()


@functools.cache
def _stock(engine_name, tmp_dir):
    return _run(tmp_dir, f"stock-{engine_name}", ENGINES[engine_name])[0]


def _differing(stock, lcx):
    assert stock["prompt_tokens"] == lcx["prompt_tokens"]
    assert max(stock["prompt_tokens"]) >= 3000, stock["prompt_tokens"]
    assert all(len(t) == MAX_TOKENS for t in lcx["token_ids"])
    return [i for i, (a, b) in enumerate(zip(stock["token_ids"], lcx["token_ids"])) if a != b]


def _explain(stock, lcx, diffs):
    return "; ".join(f"#{i}: stock {stock['texts'][i]!r} vs lcx {lcx['texts'][i]!r}" for i in diffs)


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_dense_lcx_is_token_identical_to_stock(tmp_path_factory, engine_name):
    tmp = tmp_path_factory.mktemp(engine_name)
    stock = _stock(engine_name, tmp_path_factory.getbasetemp())
    lcx, log = _run(tmp, "lcx", ENGINES[engine_name], backend="lcx", lcx={"method": "dense"})
    # The engine chose lcx, and lcx's own forward ran (its log line is written from forward()).
    assert "Using LCX backend on CPU" in log, log[-3000:]
    assert "lcx attention active: method=dense kernel=engine" in log, log[-3000:]
    assert "Using CPU_ATTN" not in log
    diffs = _differing(stock, lcx)
    assert not diffs, "outputs differ: " + _explain(stock, lcx, diffs)


def test_torch_twin_serves_the_real_engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twin")
    stock = _stock("whole_prefill", tmp_path_factory.getbasetemp())
    twin, log = _run(tmp, "twin", {}, backend="lcx", lcx={"method": "dense", "kernel": "torch"})
    assert "lcx attention active: method=dense kernel=torch" in log, log[-3000:]
    diffs = _differing(stock, twin)
    assert len(diffs) <= 2, f"the torch twin parts from stock on {len(diffs)} of {len(PROMPTS)}: " + _explain(stock, twin, diffs)
    for key, text in zip(PASS_KEYS, twin["texts"][-2:]):
        assert key in text, (key, text)


def test_triton_kernel_serves_the_real_engine_interpreted(tmp_path, monkeypatch):
    """The GPU path's kernel, run by Triton's interpreter inside the real CPU engine: the adapter's
    metadata, cache writes and launch are the ones a GPU fleet runs. Short prompts, because the
    interpreter is slow."""
    prompts, engine = ["The capital of France is", "def fibonacci(n):"], {"max_model_len": 512}

    def arm(name, **kw):
        spec = ArmSpec(model=str(prepare()), prompts=prompts, max_tokens=6, engine=engine, **kw)
        return run_arm(spec, log_path=str(tmp_path / f"{name}.log")), (tmp_path / f"{name}.log").read_text()

    stock, _ = arm("stock")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton, log = arm("triton", backend="lcx", lcx={"method": "dense", "kernel": "triton"})
    assert "lcx attention active: method=dense kernel=triton" in log, log[-3000:]
    assert triton["token_ids"] == stock["token_ids"], (triton["texts"], stock["texts"])
