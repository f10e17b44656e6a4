"""Paged attention (Triton in the interpreter, and the torch twin) against the float64 reference."""
import pytest
import torch

from lcx_plugin.kernels.paged import paged_attention
from lcx_plugin.kernels.paged.reference import paged_attention_reference

from .paged_cases import make_problem, random_selection

IMPLS = ["torch", "triton"]

# (name, seq_lens, query_lens, num_heads, num_kv_heads, block_size)
CASES = [
    ("decode_gqa3", [1, 37, 70], [1, 1, 1], 6, 2, 16),
    ("decode_gqa4_many_pages", [100, 9], [1, 1], 4, 1, 8),
    ("prefill_ragged_gqa4", [5, 1, 33], [5, 1, 33], 4, 1, 16),
    ("prefill_length_one", [1], [1], 3, 1, 16),
    ("chunked_prefill_with_context", [40, 50, 21], [8, 50, 3], 6, 2, 16),
    ("mixed_decode_and_prefill", [45, 17, 30], [1, 17, 1], 6, 2, 32),
]
DTYPE_TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}


def _run(problem, impl, selection=None):
    out = torch.full_like(problem.query, float("nan"))  # poisoned: every row must be written
    paged_attention(
        problem.query, problem.kv_cache, problem.block_table, problem.seq_lens,
        problem.query_start_loc, problem.scale, out, selection, impl=impl,
    )
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dense_matches_reference(case, dtype, impl):
    _, seq_lens, query_lens, hq, hkv, bs = case
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run
    problem = make_problem(seq_lens, query_lens, hq, hkv, block_size=bs, dtype=dtype, seed=seed)
    expected = paged_attention_reference(
        problem.query, problem.kv_cache, problem.block_table, problem.seq_lens,
        problem.query_start_loc, problem.scale,
    )
    got = _run(problem, impl)
    assert not torch.isnan(got).any(), f"seed={seed}: rows left unwritten or NaN read from unowned slots"
    err = (got.double() - expected).abs().max().item()
    assert err < DTYPE_TOL[dtype], f"seed={seed}: max abs error {err:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("granularity", ["page", "token"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=[CASES[0][0], CASES[4][0]])
def test_selection_matches_reference(case, granularity, impl):
    _, seq_lens, query_lens, hq, hkv, bs = case
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    problem = make_problem(seq_lens, query_lens, hq, hkv, block_size=bs, seed=seed)
    selection = random_selection(problem, granularity, keep=0.5, seed=seed + 1)
    expected = paged_attention_reference(
        problem.query, problem.kv_cache, problem.block_table, problem.seq_lens,
        problem.query_start_loc, problem.scale, selection,
    )
    got = _run(problem, impl, selection)
    assert not torch.isnan(got).any(), f"seed={seed}"
    err = (got.double() - expected).abs().max().item()
    assert err < DTYPE_TOL[torch.float32], f"seed={seed}: max abs error {err:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_full_selection_equals_dense(impl):
    """Selecting every page must give exactly the dense result: the selection path adds nothing."""
    problem = make_problem([37, 70], [1, 5], 6, 2, block_size=16, seed=3)
    pages = -(-problem.seq_lens // 16)
    width = int(pages.max())
    indices = torch.arange(width, dtype=torch.int32).expand(2, 2, width).contiguous()
    counts = pages[:, None].expand(2, 2).to(torch.int32).contiguous()
    from lcx_plugin.kernels.paged import Selection

    dense = _run(problem, impl)
    selected = _run(problem, impl, Selection("page", indices, counts))
    torch.testing.assert_close(selected, dense, rtol=0, atol=1e-6)


def test_bad_shapes_raise_one_clear_error():
    problem = make_problem([10], [1], 4, 2, seed=0)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        paged_attention(problem.query[:, :3], problem.kv_cache, problem.block_table, problem.seq_lens,
                        problem.query_start_loc, 1.0, problem.query[:, :3].clone())
