"""Engine runs shared by the engine tests: each configuration starts one real vLLM engine (in a child
process) once per test session, on the embedded SmolLM2-135M, with the machine's settings.

Comparisons are ISA-independent: dense lcx on the engine's own op must be token-identical to stock
on the same machine (the same arithmetic); where lcx's arithmetic differs, tests compare teacher-
forced log-probabilities against the float32 reference model (``reference_model.py``), with the
stock engine's own distance to that reference, measured in the same session, as the yardstick.
"""
from __future__ import annotations

import functools
import statistics
from pathlib import Path

import pytest

from lcx_plugin.harness.batch import ArmSpec, run_arm
from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.prompts import SHORT_PROMPTS, long_prompt
from lcx_plugin.harness.settings import choose

PASS_KEYS = ("7421", "5150")
# The long prompts: 2,000 and 1,200 tokens, far past every window and budget under test (at most
# 656 tokens attended). (3,000 before: the engine tests took about 10 min of the suite on 2 cores.)
PROMPTS = SHORT_PROMPTS + [long_prompt(2000, seed=1, key=PASS_KEYS[0]), long_prompt(1200, seed=2, key=PASS_KEYS[1])]
MAX_TOKENS = 24
# Small token budget per step: long prompts are split into chunks and scheduled together with the
# other requests' decode steps, which is the mixed prefill/decode path.
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 512}
STREAMING = {"method": "streaming", "sink": 16, "window": 256}
# Two of each layer's three KV heads stream (the shipped pattern for the embedded model); their
# cache is stored apart and holds only sinks + window.
HEAD_SPLIT = {"method": "head_split", "streaming_fraction": 0.67, "sink": 16, "window": 256}

# TokenSelect at decode: a budget far smaller than the long prompts, no selection cache (so the
# float32 reference can state the selection exactly). Eight requests of different lengths, all
# long enough to select, at most three at a time: requests join and leave the batch's rows as
# others finish (with the cache on, each is also run alone).
TOKEN_SELECT = {"method": "token_select", "sink": 16, "window": 128, "budget": 192, "reuse_similarity": None}
QUANT_PROMPTS = [PROMPTS[0], PROMPTS[-1]]
# HiP in prefill and decode: 3 of the 1,200- and 2,000-token prompts' 128-token pages per query
# block of 64 rows (and per decode step) beyond sinks and window; a search every decode step, so
# the float32 reference can state every selection; layer 0 dense. Every prompt is one prefill
# chunk, so query blocks start at each prompt's first row.
HIP = {"method": "hip", "sink": 16, "window": 256, "budget": 384, "query_block": 64, "refresh_every": 1,
       "dense_layers": [0]}
HIP_EXTRAPOLATE = {**HIP, "window": 128, "budget": 128, "dense_layers": [], "extrapolate": True}
# TokenSelect past the trained length: prompt blocks of 64 rows select too, every row is read at
# compacted positions, and scores are position-neutral.
TOKEN_SELECT_EXTRAPOLATE = {**TOKEN_SELECT, "budget": 128, "prefill": "select", "query_block": 64, "extrapolate": True}
SELECT_PROMPTS = [long_prompt(400 + 120 * i, seed=20 + i, key=str(3100 + 7 * i)) for i in range(8)]
# Arms checked against a float32 reference that states a data-dependent selection (a top-k of q.k,
# HiP's page bounds) or a reading whose distance from another is judged against the noise floor
# run the engine in float32 on every machine, against a float32 stock yardstick ("stock_f32"): in
# bfloat16 (the settings' choice on a CPU with native bf16) the engine's rounding flips near-tied
# selections that the reference makes in float32, and the verdict would depend on the CPU.
REFERENCE_DTYPE = {"dtype": "float32"}

ARMS = {
    "stock": dict(),
    "stock_f32": dict(engine=REFERENCE_DTYPE),  # "stock" itself where the settings chose float32
    "dense": dict(backend="lcx", lcx={"method": "dense"}),
    "twin": dict(backend="lcx", lcx={"method": "dense", "kernel": "torch"}),
    # A window longer than every prompt: every sequence stays dense.
    "streaming_wide": dict(backend="lcx", lcx={"method": "streaming", "sink": 64, "window": 8192}),
    # A window far shorter than the long prompts, chunked prefill. (Batched against alone, prefix
    # caching and preemption, for every method: tests/reliability.)
    "streaming": dict(backend="lcx", lcx=STREAMING, engine=CHUNKED),
    # Head split, default engine settings (one prefill chunk far longer than the window).
    "head_split": dict(backend="lcx", lcx=HEAD_SPLIT),
    # A window longer than every prompt, every head's cache kept: every sequence stays dense.
    "head_split_wide": dict(backend="lcx", lcx={**HEAD_SPLIT, "window": 8192, "save_memory": False}),
    "token_select": dict(backend="lcx", lcx=TOKEN_SELECT, prompts=SELECT_PROMPTS, max_tokens=16,
                         engine={"max_num_seqs": 3, **REFERENCE_DTYPE}),
    # HiP against its float32 statement.
    "hip": dict(backend="lcx", lcx=HIP, engine={"max_num_batched_tokens": 8192, "enable_prefix_caching": False,
                                                 **REFERENCE_DTYPE}),
    # A budget covering every context: every sequence stays dense, on the engine's own op.
    "hip_wide": dict(backend="lcx", lcx={**HIP, "budget": 1.0}),
    # Streaming at compacted positions (sinks right before the window), a 1,000-token prompt:
    # against the float32 reference read the same way (tests/engine/test_extrapolation.py).
    "streaming_extrapolate": dict(backend="lcx", lcx={**STREAMING, "extrapolate": True}, engine={**CHUNKED, **REFERENCE_DTYPE},
                                  prompts=[SELECT_PROMPTS[5]], max_tokens=16),
    # HiP at compacted positions, every layer selecting, one page beyond a 128-token window on a
    # 640-token prompt (the compacted reference costs T^2 per layer and head in plain torch).
    "hip_extrapolate": dict(backend="lcx", lcx=HIP_EXTRAPOLATE, prompts=[SELECT_PROMPTS[2]],
                            engine={"max_num_batched_tokens": 8192, "enable_prefix_caching": False, **REFERENCE_DTYPE}),
    "token_select_extrapolate": dict(backend="lcx", lcx=TOKEN_SELECT_EXTRAPOLATE, prompts=[SELECT_PROMPTS[2]],
                                     engine={"max_num_batched_tokens": 8192, "enable_prefix_caching": False, **REFERENCE_DTYPE}),
    # A budget covering every context: decode stays dense, on the engine's own op.
    "token_select_wide": dict(backend="lcx", lcx={**TOKEN_SELECT, "budget": 1.0}),
    # Quantized pages (lcx's torch twin reads them), composed with a head split too: a short
    # prompt and the 1,200-token passkey prompt.
    "int8": dict(backend="lcx", lcx={"method": "dense", "kv_format": "int8"}, prompts=QUANT_PROMPTS),
    "int4": dict(backend="lcx", lcx={"method": "dense", "kv_format": "int4"}, prompts=QUANT_PROMPTS),
    "head_split_int4": dict(backend="lcx", lcx={**HEAD_SPLIT, "kv_format": "int4"}, prompts=QUANT_PROMPTS),
    # Mixed precision at its default fraction (capacity), and with half of each page in int8 slots on
    # short prompts, where every token holds one (the engine's slots, written and read, checked
    # against the reference's int8 values).
    "mixed": dict(backend="lcx", lcx={"method": "dense", "kv_format": "mixed"}, prompts=SHORT_PROMPTS[:1], max_tokens=4),
    "mixed_all_slots": dict(backend="lcx", lcx={"method": "dense", "kv_format": "mixed", "kv_high_fraction": 0.5},
                            prompts=SHORT_PROMPTS),
    "head_split_mixed": dict(backend="lcx", lcx={**HEAD_SPLIT, "kv_format": "mixed"}, prompts=QUANT_PROMPTS,
                             max_tokens=8),
    # The GPU path's Triton kernel, run by Triton's interpreter inside the real CPU engine: the
    # adapter's metadata, cache writes and launch are the ones a GPU fleet runs. Short prompts and
    # few tokens, because the interpreter is slow.
    "triton": dict(backend="lcx", lcx={"method": "dense", "kernel": "triton"}, prompts=PROMPTS[:2], max_tokens=6),
}


def _float32_machine() -> bool:
    """Whether this machine's settings already run every engine in ``REFERENCE_DTYPE``."""
    return choose().dtype == REFERENCE_DTYPE["dtype"]


@functools.cache
def _run(name: str, log_dir: str) -> tuple[dict, str]:
    if name == "stock_f32" and _float32_machine():
        return _run("stock", log_dir)  # the same engine: run it once
    kw = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, **ARMS[name]}
    log = Path(log_dir) / f"{name}.log"
    spec = ArmSpec(model=str(prepare()), prompt_logprobs=True, logprobs=True, **kw)
    return run_arm(spec, log_path=str(log)), log.read_text()


@pytest.fixture(scope="session")
def arm(tmp_path_factory):
    """``arm(name) -> (result, engine log)``, each configuration run once per session."""
    log_dir = str(tmp_path_factory.mktemp("engine-logs"))
    return lambda name: _run(name, log_dir)


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(prepare())


def gap(a: list, b: list) -> dict:
    """Distance between two per-token log-probability lists (None entries skipped)."""
    d = sorted(abs(x - y) for x, y in zip(a, b) if x is not None and y is not None)
    assert d, "nothing to compare"
    return {"mean": statistics.fmean(d), "p99": d[min(len(d) - 1, int(0.99 * len(d)))], "max": d[-1], "n": len(d)}


def within(got: dict, yardstick: dict, mean_slack: float = 1.25, p99_slack: float = 1.5) -> bool:
    """``got`` is no further from the reference than the stock engine is (``yardstick``), up to a
    stated slack: mean x1.25 + 0.01 nats, p99 x1.5 + 0.05 nats."""
    return got["mean"] <= mean_slack * yardstick["mean"] + 0.01 and got["p99"] <= p99_slack * yardstick["p99"] + 0.05


@pytest.fixture(scope="session")
def stock_yardstick(arm, model_path):
    """Per prompt: the stock engine's distance to the dense float32 reference (this machine, this session)."""
    return _yardstick(arm("stock")[0], model_path)


@pytest.fixture(scope="session")
def stock_yardstick_f32(arm, model_path, stock_yardstick):
    """The same for the stock engine in float32 (``REFERENCE_DTYPE``), the yardstick of the arms that run so."""
    return stock_yardstick if _float32_machine() else _yardstick(arm("stock_f32")[0], model_path)


def _yardstick(stock: dict, model_path: str) -> list[dict]:
    from .reference_model import token_logprobs

    return [gap(lp[1:], token_logprobs(model_path, ids)) for ids, lp in zip(stock["prompt_token_ids"], stock["prompt_logprobs"])]


def whole(gaps: list[dict]) -> dict:
    """Pool per-prompt gaps, weighted by tokens."""
    n = sum(g["n"] for g in gaps)
    return {"mean": sum(g["mean"] * g["n"] for g in gaps) / n, "p99": max(g["p99"] for g in gaps), "n": n}
