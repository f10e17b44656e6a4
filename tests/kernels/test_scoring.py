"""Decode scoring pass (token logits and Quest page bounds): the torch twin and Triton (in the
interpreter, see tests/conftest.py) against the float64 references.

Every test draws fresh random inputs (the seed is in the failure message), passes an ``out``
poisoned with NaN, and keeps every cache slot and page summary nobody owns at NaN, so a kernel
that reads outside a sequence's context, or leaves a logit unwritten, fails.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcx_plugin.kernels.paged import BatchPlan, formats, page_logits, scoring_triton, token_logits
from lcx_plugin.kernels.paged.rope import Rope
from lcx_plugin.kernels.paged.reference import page_logits_reference, token_logits_reference
from lcx_plugin.state import PageSummaries

from .paged_cases import FORMATS, FOUR_D_FORMATS, make_problem

IMPLS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
# Absolute error on logits of order 1 (unit-normal q and k, scale = D**-0.5). Both implementations
# multiply the cache's own values in float32, so a bf16 cache is held to the same bound: its
# rounding is in the inputs the reference reads too, not in the arithmetic.
ATOL = 1e-4

# (name, seq_lens, num_heads, num_kv_heads, block_size), head_dim 64: lengths 1, exactly a page,
# partial last pages and several pages; GQA groups 3, 1 and 4.
CASES = [
    ("gqa3_mixed_lengths", [1, 16, 37, 70], 6, 2, 16),
    ("mha_pages_of_8", [8, 5, 41], 2, 2, 8),
    ("gqa4_many_pages", [100, 9], 4, 1, 8),
]
EXTRA = 3  # columns of ``out`` past the result, which must stay untouched


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run


def _problem(case, dtype=torch.float32, seed=0, fmt="plain"):
    _, seq_lens, hq, hkv, bs = case
    return make_problem(seq_lens, [1] * len(seq_lens), hq, hkv, block_size=bs, dtype=dtype, seed=seed, fmt=fmt)


def _poisoned(query, n):
    return torch.full((query.shape[0], query.shape[1], n + EXTRA), float("nan"))


def _check(res, out, expected, ends, seed):
    """``res`` is ``out``'s prefix, finite and within ATOL of ``expected`` before each row's end,
    exactly -inf after it; ``out`` past the result untouched."""
    n = expected.shape[2]
    assert res.shape == expected.shape and res.data_ptr() == out.data_ptr(), f"seed={seed}: not written in place"
    assert torch.isnan(out[:, :, n:]).all(), f"seed={seed}: wrote past the result's {n} columns"
    for b, end in enumerate(ends):
        assert torch.isfinite(res[b, :, :end]).all(), f"seed={seed}: sequence {b} has unwritten or NaN logits"
        assert (res[b, :, end:] == float("-inf")).all(), f"seed={seed}: sequence {b} is not -inf past its end"
    live = torch.isfinite(expected)
    err = (res.double()[live] - expected[live]).abs().max().item()
    assert err < ATOL, f"seed={seed}: max abs error {err:.3g}"


def _check_tokens(problem, impl, seed, **kw):
    expected = token_logits_reference(problem.query, problem.kv, problem.plan, problem.scale)
    out = _poisoned(problem.query, expected.shape[2])
    res = token_logits(problem.query, problem.kv, problem.plan, problem.scale, out, impl=impl, **kw)
    _check(res, out, expected, problem.plan.lens, seed)
    return res


# ----------------------------------------------------------------------------- token logits

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_token_logits_match_reference(case, dtype, impl):
    seed = _seed()
    _check_tokens(_problem(case, dtype, seed), impl, seed, chunk_pages=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_token_logits_every_storage_format(fmt, impl):
    """Each engine's layout read in place: plain pages, vLLM CPU's packing (keys transposed; AMX
    tiles), vLLM CUDA's [blocks, block_size, Hkv, D] and SGLang's token pool."""
    if impl == "triton" and fmt not in FOUR_D_FORMATS:
        pytest.skip(f"{fmt} is a CPU-only tiled layout; the Triton kernel reads 4-D strided pages")
    seed = _seed()
    dtype = torch.bfloat16 if fmt == "vllm-cpu-amx" else torch.float32
    _check_tokens(_problem(CASES[0], dtype, seed, fmt), impl, seed)


ROPES = {"neox_theta1e4": Rope.standard(64), "neox_theta1e5_linear4": Rope.standard(64, 1e5, position_scale=4.0),
         "gptj_partial32": Rope.standard(64, rotary_dim=32, neox=False)}


@pytest.mark.parametrize("rope", list(ROPES.values()), ids=list(ROPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_position_neutral_token_logits_match_reference(case, rope, impl):
    """``rope`` given: keys turned back from their positions, the query from its own, then q·k."""
    seed = _seed()
    p = _problem(case, seed=seed)
    qpos = torch.tensor([s - 1 + 1000 * b for b, s in enumerate(p.plan.lens)])  # any position, also far away
    expected = token_logits_reference(p.query, p.kv, p.plan, p.scale, rope, qpos)
    out = _poisoned(p.query, expected.shape[2])
    res = token_logits(p.query, p.kv, p.plan, p.scale, out, rope=rope, query_positions=qpos, chunk_pages=2, impl=impl)
    _check(res, out, expected, p.plan.lens, seed)
    plain = token_logits_reference(p.query, p.kv, p.plan, p.scale)
    assert (res.double() - plain).abs()[torch.isfinite(plain)].max() > 0.1, f"seed={seed}: nothing was turned"


@pytest.mark.parametrize("rope", [None, ROPES["neox_theta1e4"]], ids=["rotated", "position_neutral"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rows_reading_one_sequence_match_reference(rope, impl):
    """A prompt's query blocks, scored at once: every row reads the same sequence's pages up to its
    own length (the torch twin gathers and re-positions those keys once for all rows)."""
    seed = _seed()
    one = make_problem([70], [1], 6, 2, block_size=16, seed=seed)
    lens = [70, 37, 16, 1, 64]
    plan = BatchPlan.from_lists([1] * len(lens), lens, one.plan.block_table[:1].expand(len(lens), -1))
    query = torch.randn(len(lens), 6, 64, generator=torch.Generator().manual_seed(seed))
    qpos = None if rope is None else torch.tensor(lens) - 1
    expected = token_logits_reference(query, one.kv, plan, one.scale, rope, qpos)
    out = _poisoned(query, expected.shape[2])
    res = token_logits(query, one.kv, plan, one.scale, out, rope=rope, query_positions=qpos, chunk_pages=2, impl=impl)
    _check(res, out, expected, lens, seed)


def test_position_neutral_logits_are_the_unrotated_products():
    """Keys cached rotated at their positions and a query rotated at a position far past them score
    exactly what the un-rotated vectors give: distance no longer enters."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    rope, n, bs, hkv, hq, d = ROPES["neox_theta1e4"], 40, 8, 2, 4, 64
    k0 = torch.randn(n, hkv, d, generator=g, dtype=torch.float64)
    q0 = torch.randn(1, hq, d, generator=g, dtype=torch.float64)
    kv = formats.plain(torch.full((6, hkv, bs, 2 * d), float("nan")))
    table = torch.tensor([[3, 0, 5, 1, 2]], dtype=torch.int32)
    slots = table[0].long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    kv.write(rope.rotate(k0, torch.arange(n)[:, None]).float(), torch.zeros(n, hkv, d), slots)
    at = 50_000
    q = rope.rotate(q0, torch.tensor(float(at))).float()
    plan = BatchPlan.from_lists([1], [n], table)
    res = token_logits(q, kv, plan, 0.125, rope=rope, query_positions=torch.tensor([at]))
    want = 0.125 * torch.einsum("hgd,nhd->hgn", q0[0].view(hkv, hq // hkv, d), k0).reshape(hq, n)
    assert (res[0].double() - want).abs().max() < 1e-3, f"seed={seed}"


def test_token_logits_chunking_does_not_change_the_result():
    """Fewer pages per torch chunk, or per Triton program, than a sequence has give the one-chunk
    result (gqa4_many_pages: 13 pages of 8)."""
    seed = _seed()
    p = _problem(CASES[2], torch.float32, seed)
    whole = token_logits(p.query, p.kv, p.plan, p.scale, impl="torch", chunk_pages=64)
    for chunk in (1, 3, 5):
        part = token_logits(p.query, p.kv, p.plan, p.scale, impl="torch", chunk_pages=chunk)
        # Another chunking is another matmul shape, summed in another order: float32 rounding only
        # (1.2e-6 seen on logits of about 2.4, one seed in CI). A page read twice or skipped moves them by O(1).
        torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed={seed}, chunk={chunk}: {m}")
    for ppp in (1, 2):
        out = torch.empty_like(whole)
        scoring_triton.token_logits_triton(p.query, p.kv, p.plan, p.scale, out, pages_per_program=ppp)
        torch.testing.assert_close(out, whole, rtol=0, atol=1e-5, msg=lambda m: f"seed={seed}, ppp={ppp}: {m}")


def test_auto_on_cpu_is_the_torch_twin_and_out_is_optional():
    p = _problem(CASES[1], torch.float32, _seed())
    res = token_logits(p.query, p.kv, p.plan, p.scale)
    assert res.shape == (3, 2, 41) and res.dtype == torch.float32
    assert torch.equal(res, token_logits(p.query, p.kv, p.plan, p.scale, impl="torch"))


# ----------------------------------------------------------------------------- page logits

def _random_summaries(problem, seed):
    """Random per-block key ranges (kmin <= kmax) for the blocks the sequences own; NaN elsewhere."""
    g = torch.Generator().manual_seed(seed)
    kv, plan = problem.kv, problem.plan
    kmin = torch.randn(kv.num_blocks, kv.num_kv_heads, kv.head_dim, generator=g)
    kmax = kmin + torch.rand(kmin.shape, generator=g) * 2
    owned = torch.zeros(kv.num_blocks, dtype=torch.bool)
    for b, n in enumerate(plan.lens):
        owned[plan.block_table[b, : -(-n // kv.block_size)].long()] = True
    kmin[~owned] = float("nan")
    kmax[~owned] = float("nan")
    return kmin, kmax


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32_query", "bf16_query"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_page_logits_match_reference(case, dtype, impl):
    seed = _seed()
    p = _problem(case, dtype, seed)
    bs = p.kv.block_size
    kmin, kmax = _random_summaries(p, seed + 1)
    expected = page_logits_reference(p.query, kmin, kmax, p.plan, bs, p.scale)
    out = _poisoned(p.query, expected.shape[2])
    res = page_logits(p.query, kmin, kmax, p.plan, bs, p.scale, out, impl=impl)
    _check(res, out, expected, [-(-n // bs) for n in p.plan.lens], seed)


def _summaries_of(problem) -> PageSummaries:
    """The page summaries the engine would have written alongside the cache's keys."""
    kv, plan = problem.kv, problem.plan
    bs, hkv = kv.block_size, kv.num_kv_heads
    pages = PageSummaries(kv.num_blocks, hkv, kv.head_dim, bs)
    for b, n in enumerate(plan.lens):
        blocks = plan.block_table[b, : -(-n // bs)].long()
        k, _ = kv.gather(blocks[:, None].expand(-1, hkv), torch.arange(hkv)[None, :].expand(len(blocks), -1))
        keys = k.transpose(1, 2).reshape(-1, hkv, kv.head_dim)[:n]  # [n, Hkv, D], position order
        pos = torch.arange(n)
        pages.update(keys, blocks[pos // bs] * bs + pos % bs)
    return pages


@settings(max_examples=30, deadline=None)
@given(seq_lens=st.lists(st.integers(1, 40), min_size=1, max_size=3), block_size=st.sampled_from([1, 4, 8, 16]),
       group=st.sampled_from([1, 3]), head_dim=st.sampled_from([8, 64]), seed=st.integers(0, 10_000))
def test_page_bound_covers_every_token_logit_of_its_page(seq_lens, block_size, group, head_dim, seed):
    """Quest's bound from the keys' own min/max is >= every q·k in the page, and equals it for
    one-token pages."""
    p = make_problem(seq_lens, [1] * len(seq_lens), 2 * group, 2, head_dim=head_dim, block_size=block_size, seed=seed)
    pages = _summaries_of(p)
    tokens = token_logits(p.query, p.kv, p.plan, p.scale, impl="torch")
    bounds = page_logits(p.query, pages.min, pages.max, p.plan, block_size, p.scale, impl="torch")
    for b, n in enumerate(seq_lens):
        padded = torch.full((tokens.shape[1], -(-n // block_size) * block_size), float("-inf"))
        padded[:, :n] = tokens[b, :, :n]
        best = padded.view(tokens.shape[1], -1, block_size).amax(-1)  # [Hq, pages of b]
        bound = bounds[b, :, : best.shape[1]]
        slack = 1e-5 * (1 + best.abs())
        assert (bound >= best - slack).all(), f"bound below a token logit: {(best - bound).max().item():.3g}"
        if block_size == 1:
            torch.testing.assert_close(bound, best, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors

def test_triton_refuses_a_tiled_format():
    p = _problem(CASES[0], torch.bfloat16, 0, fmt="vllm-cpu-amx")
    with pytest.raises(ValueError, match="tiled"):
        token_logits(p.query, p.kv, p.plan, p.scale, impl="triton")


def test_bad_inputs_raise_one_clear_error():
    p = _problem(CASES[1], torch.float32, 0)  # 3 sequences, 2 heads, 2 KV heads, head_dim 64
    q, kv, plan = p.query, p.kv, p.plan
    kmin = torch.zeros(kv.num_blocks, 2, 64)
    with pytest.raises(ValueError, match="head_dim 32 != cache head_dim 64"):
        token_logits(q[..., :32], kv, plan, 1.0)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        token_logits(torch.zeros(3, 3, 64), kv, plan, 1.0)
    with pytest.raises(ValueError, match="query has 2 rows but the plan has 3 sequences"):
        token_logits(q[:2], kv, plan, 1.0)
    with pytest.raises(ValueError, match=r"out must be float32 \[3, 2, >= 41\]"):
        token_logits(q, kv, plan, 1.0, torch.zeros(3, 2, 40))
    with pytest.raises(ValueError, match="out must be float32"):
        token_logits(q, kv, plan, 1.0, torch.zeros(3, 2, 41, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_pages"):
        token_logits(q, kv, plan, 1.0, chunk_pages=0)
    with pytest.raises(ValueError, match="impl must be"):
        token_logits(q, kv, plan, 1.0, impl="cuda")
    with pytest.raises(ValueError, match="kmin and kmax must both be"):
        page_logits(q, kmin, kmin[:, :1], plan, 8, 1.0)
    with pytest.raises(ValueError, match="page summary head_dim"):
        page_logits(q[..., :32], kmin, kmin, plan, 8, 1.0)
    with pytest.raises(ValueError, match="fewer than the 11 pages"):  # the table has 7 columns
        page_logits(q, kmin, kmin, plan, 4, 1.0)
