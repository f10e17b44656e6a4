"""Quantized pages (``kv_format`` int8 / int4) in the real engine: the capacity vLLM itself reports,
teacher-forced agreement with the float32 reference model reading the same quantized keys and
values, and the next-token KL divergence each format costs against dense attention.

The reference quantizes every key and value with lcx's own quantizer (the format under test, its
round trip held to its analytic bound in tests/kernels/test_quant.py); the engine must attend
over its pages as that reference does, within a yardstick measured in the same session (see
``_against_quantized_reference``). Capacities compare at bfloat16 (a float32 engine's plain pages are twice as large; a
quantized page is sized in bytes, whatever the model's dtype)."""
import statistics

import pytest

from .conftest import HEAD_SPLIT, gap, whole, within
from .reference_model import next_token_kl, token_logprobs
from .test_head_split import _mask

pytestmark = pytest.mark.slow

GROUP = 64  # the default group: the whole head of the embedded model
BITS = {"int8": 8, "int4": 4}


def _capacity_ratio(arm, name: str) -> float:
    stock, _ = arm("stock")
    quant, _ = arm(name)
    return quant["kv_capacity"]["tokens_bf16"] / stock["kv_capacity"]["tokens_bf16"]


@pytest.mark.parametrize("name,least", [("int8", 1.85), ("int4", 3.3)])
def test_quantized_pages_raise_the_engines_kv_capacity(arm, name, least):
    """int8: 68 bytes per token and head per side against bf16's 128; int4: 36. The engine's own
    figure (its log's "KV cache size"), same VLLM_CPU_KVCACHE_SPACE."""
    result, log = arm(name)
    assert f"kv_format={name}" in log and "kernel=torch" in log, log[-3000:]
    ratio = _capacity_ratio(arm, name)
    assert ratio >= least, (name, ratio)


def test_head_split_with_int4_pages_multiplies_the_savings(arm):
    """Two of three KV heads streaming (sinks + window only) and every page int4: at least 8x the
    engine-reported KV tokens of stock bf16."""
    assert _capacity_ratio(arm, "head_split_int4") >= 8


def _unit_roundoff() -> float:
    """Relative precision of the engine's keys and values (the machine's dtype, as the arms run)."""
    from lcx_plugin.harness.settings import choose

    return 2.0 ** -9 if choose().dtype == "bfloat16" else 2.0 ** -24


def _against_quantized_reference(result, model_path, stock_yardstick, fmt, **restriction):
    """Teacher-forced gaps of the engine to the reference reading the same quantized values, and the
    yardstick: stock's own distance to the dense reference plus the format's amplification of
    arithmetic noise (the reference against itself with keys and values perturbed at the engine's
    precision before they are quantized). A quantizer turns a tiny input difference into a whole
    code step wherever a value sits near a rounding boundary; through 30 layers int4 amplifies
    1e-6 relative noise into ~0.24 nats per token, as much as int4 differs from dense, so this is
    what "matching" can mean at the model's scale (the kernels match exactly on the same codes:
    tests/kernels/test_quant.py)."""
    got, floor = [], []
    for i, ids in enumerate(result["prompt_token_ids"]):
        full = ids + result["token_ids"][i]
        ref = token_logprobs(model_path, full, kv_quant=fmt, **restriction)
        noisy = token_logprobs(model_path, full, kv_quant=fmt, kv_noise=_unit_roundoff(), **restriction)
        got.append(gap(result["prompt_logprobs"][i][1:] + result["logprobs"][i], ref))
        floor.append(gap(noisy, ref))
    stock, amplified = whole(stock_yardstick), whole(floor)
    yard = {"mean": stock["mean"] + amplified["mean"], "p99": stock["p99"] + amplified["p99"]}
    return whole(got), yard


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_engine_matches_the_quantized_reference(arm, model_path, stock_yardstick, name):
    """Prefill (a 1,200-token prompt among them) and decode, teacher-forced, at the machine's dtype:
    the engine attends over its quantized pages as the float32 reference over the same quantized
    values, within the yardstick above; and it is really quantized: further from the dense
    reference than stock is."""
    result, log = arm(name)
    got, yard = _against_quantized_reference(result, model_path, stock_yardstick, (BITS[name], GROUP))
    print(f"{name}: engine {got} yardstick {yard}")
    assert within(got, yard), (name, got, yard)
    if name == "int4":
        dense = whole([gap(result["prompt_logprobs"][i][1:] + result["logprobs"][i],
                           token_logprobs(model_path, ids + result["token_ids"][i]))
                       for i, ids in enumerate(result["prompt_token_ids"])])
        assert dense["mean"] > 3 * whole(stock_yardstick)["mean"], (dense, whole(stock_yardstick))


def test_head_split_with_int4_pages_matches_its_reference(arm, model_path, stock_yardstick):
    """Streaming heads (their own int4 companion cache, sinks + window) and retrieval heads (int4
    pages), teacher-forced against the reference restricted and quantized the same way."""
    result, log = arm("head_split_int4")
    assert "method=head_split kernel=torch" in log, log[-3000:]
    got, yard = _against_quantized_reference(result, model_path, stock_yardstick, (4, GROUP), sink=HEAD_SPLIT["sink"],
                                              window=HEAD_SPLIT["window"], streaming=_mask())
    print(f"head_split_int4: engine {got} yardstick {yard}")
    assert within(got, yard), (got, yard)


def _mixed(result, i: int, fraction: float = 0.125) -> tuple:
    """The reference's statement of the engine's mixed pages for prompt ``i``: its block size, and
    the prompt as one prefill chunk (the arm's token budget holds it)."""
    return ("mixed", GROUP, result["kv_capacity"]["block_size"], fraction, len(result["prompt_token_ids"][i]))


def test_mixed_pages_raise_the_engines_kv_capacity(arm):
    """int4 rows (72 bytes per token and head) plus each page's share of its int8 slot pool (one
    token in eight: 2 x 68 bytes + a 4-byte header): 92 bytes against bf16's 256."""
    result, log = arm("mixed")
    assert "kv_format=mixed" in log and "kv_high_fraction=0.125" in log and "kernel=torch" in log, log[-3000:]
    assert _capacity_ratio(arm, "mixed") >= 2.7


def test_mixed_engine_reads_and_writes_its_int8_slots(arm, model_path, stock_yardstick):
    """Half of each page in slots, short prompts: every token of every request holds an int8 slot
    (the sinks, then each decode token a free one), so the engine must attend as the reference over
    lcx's mixed format does, within the quantized yardstick; and far from the same tokens read at
    int4 (the slots are really written and read). On long prompts, which tokens hold slots cannot
    be checked this way: through 30 layers a quantizer turns the engine's arithmetic noise into as
    much as mixed differs from dense (~0.18 nats per token, measured); the choice is checked in
    tests/unit/test_layer_core.py and tests/kernels/test_mixed.py instead."""
    result, log = arm("mixed_all_slots")
    assert "kv_high_fraction=0.5" in log, log[-3000:]
    got, floor, far = [], [], []
    for i, ids in enumerate(result["prompt_token_ids"]):
        full = ids + result["token_ids"][i]
        assert len(full) <= result["kv_capacity"]["block_size"] // 2  # one page, every token in a slot
        spec = _mixed(result, i, fraction=0.5)
        ref = token_logprobs(model_path, full, kv_quant=spec)
        noisy = token_logprobs(model_path, full, kv_quant=spec, kv_noise=_unit_roundoff())
        engine = result["prompt_logprobs"][i][1:] + result["logprobs"][i]
        got.append(gap(engine, ref))
        floor.append(gap(noisy, ref))
        far.append(gap(engine, token_logprobs(model_path, full, kv_quant=(4, GROUP))))
    stock, amplified = whole(stock_yardstick), whole(floor)
    yard = {"mean": stock["mean"] + amplified["mean"], "p99": stock["p99"] + amplified["p99"]}
    got, far = whole(got), whole(far)
    print(f"mixed, every token in a slot: engine {got} yardstick {yard}; against int4 {far}")
    assert within(got, yard), (got, yard)
    assert far["mean"] > 3 * got["mean"], (far, got)


def test_head_split_with_mixed_pages_serves_and_multiplies_the_savings(arm):
    """Streaming heads in their own mixed companion cache (its pages half as long, the same cell):
    the engine serves, and its capacity is the split's times mixed's."""
    result, log = arm("head_split_mixed")
    assert "kv_format=mixed" in log and "method=head_split" in log, log[-3000:]
    assert all(len(t) == 8 for t in result["token_ids"]), result["token_ids"]
    assert _capacity_ratio(arm, "head_split_mixed") >= 6.5


def test_kl_divergence_from_dense_orders_the_formats(arm, model_path):
    """Mean KL(dense || quantized) of the next-token distribution over real prompts (the served
    prompts, whole distributions from the reference model): int8 far tighter than int4, both small,
    and mixed precision (int4 plus int8 slots for the tokens the prompt's end attends to) below int4."""
    result, _ = arm("int4")
    ids = result["prompt_token_ids"][-1]  # the 1,200-token passkey prompt
    kl = {}
    for name, fmt in {**{n: (b, GROUP) for n, b in BITS.items()},
                      "mixed": ("mixed", GROUP, result["kv_capacity"]["block_size"], 0.125, len(ids))}.items():
        per_token = next_token_kl(model_path, ids, fmt)
        kl[name] = statistics.fmean(per_token)
    print(f"mean KL(dense || quantized) over {len(per_token)} positions: {kl}")
    assert kl["int8"] < kl["int4"] / 10, kl
    assert kl["int8"] < 2e-3 and kl["int4"] < 0.1, kl
    assert kl["int8"] < kl["mixed"] < kl["int4"], kl
