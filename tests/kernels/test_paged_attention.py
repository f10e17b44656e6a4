"""Paged attention (Triton in the interpreter, and the torch twin) against the float64 reference.

Every test draws fresh random inputs (the seed is in the failure message), poisons the output
with NaN first and keeps every cache slot nobody owns at NaN.
"""
import pytest
import torch

from lcx_plugin.kernels.paged import Selection, paged_attention, torch_impl
from lcx_plugin.kernels.paged.reference import paged_attention_reference

from .paged_cases import FORMATS, FOUR_D_FORMATS, make_problem, random_selection

IMPLS = ["torch", "triton"]
TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}

# (name, seq_lens, query_lens, num_heads, num_kv_heads, block_size)
CASES = [
    ("decode_gqa3", [1, 37, 70], [1, 1, 1], 6, 2, 16),
    ("decode_gqa4_many_pages", [100, 9], [1, 1], 4, 1, 8),
    ("prefill_ragged_gqa4", [5, 1, 33], [5, 1, 33], 4, 1, 16),
    ("prefill_length_one", [1], [1], 3, 1, 16),
    ("chunked_prefill_with_context", [40, 50, 21], [8, 50, 3], 6, 2, 16),
    ("mixed_decode_and_prefill", [45, 17, 30], [1, 17, 1], 6, 2, 32),
]
CHUNKED = CASES[4]


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run


def _check(problem, impl, selection, seed, dtype=torch.float32):
    expected = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, selection)
    out = torch.full_like(problem.query, float("nan"))  # poisoned: every row must be written
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, selection, impl=impl)
    assert not torch.isnan(out).any(), f"seed={seed}: rows left unwritten or NaN read from unowned slots"
    err = (out.double() - expected).abs().max().item()
    assert err < TOL[dtype], f"seed={seed}: max abs error {err:.3g}"
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dense_matches_reference(case, dtype, impl):
    _, seq_lens, query_lens, hq, hkv, bs = case
    seed = _seed()
    problem = make_problem(seq_lens, query_lens, hq, hkv, block_size=bs, dtype=dtype, seed=seed)
    _check(problem, impl, None, seed, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_storage_format_matches_reference(fmt, impl):
    """Each engine's layout, read in place: lcx's plain pages, vLLM CPU's per-ISA packing (keys
    transposed; AMX tiles), vLLM CUDA's [blocks, block_size, Hkv, D] and SGLang's token pool."""
    if impl == "triton" and fmt not in FOUR_D_FORMATS:
        pytest.skip(f"{fmt} is a CPU-only tiled layout; the Triton kernel reads 4-D strided pages")
    _, seq_lens, query_lens, hq, hkv, bs = CHUNKED
    seed = _seed()
    dtype = torch.bfloat16 if fmt == "vllm-cpu-amx" else torch.float32
    problem = make_problem(seq_lens, query_lens, hq, hkv, block_size=bs, dtype=dtype, seed=seed, fmt=fmt)
    _check(problem, impl, None, seed, dtype)
    sel = random_selection(problem, "token", 0.3, seed + 1, sink=3, window=7)
    _check(problem, impl, sel, seed, dtype)


# (name, case, selection kwargs)
SELECTIONS = [
    ("page_lists_decode", CASES[0], dict(granularity="page", keep=0.5)),
    ("token_lists_decode", CASES[0], dict(granularity="token", keep=0.5)),
    ("page_lists_chunked", CHUNKED, dict(granularity="page", keep=0.5)),
    ("token_lists_chunked", CHUNKED, dict(granularity="token", keep=0.4)),
    # Sinks and a recent window relative to each query row, across page boundaries (block 8).
    ("window_across_pages", ("w", [37, 70, 20], [9, 30, 1], 4, 2, 8), dict(granularity="page", keep=0.0, sink=5, window=11)),
    # Sequences shorter than sink + window: everything visible.
    ("window_longer_than_sequence", ("s", [10, 3], [4, 3], 4, 2, 8), dict(granularity="page", keep=0.0, sink=4, window=16)),
    # Window plus listed tokens that overlap it: each key counted once.
    ("window_plus_token_lists", CHUNKED, dict(granularity="token", keep=0.5, sink=2, window=6)),
    ("window_plus_page_lists", CHUNKED, dict(granularity="page", keep=0.3, sink=4, window=9)),
    # A list per query block of 16 rows (HiP-style per-block choices), with a window.
    ("query_blocks", ("q", [60, 44], [40, 44], 4, 2, 8), dict(granularity="page", keep=0.4, sink=1, window=5, query_block=16)),
    ("query_blocks_tokens", ("q", [60, 44], [40, 44], 4, 2, 8), dict(granularity="token", keep=0.2, query_block=16)),
    # Only sinks: window 0.
    ("sinks_only", CHUNKED, dict(granularity="page", keep=0.0, sink=6, window=0)),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name, case, kw", SELECTIONS, ids=[s[0] for s in SELECTIONS])
def test_selection_matches_reference(name, case, kw, impl):
    _, seq_lens, query_lens, hq, hkv, bs = case
    seed = _seed()
    problem = make_problem(seq_lens, query_lens, hq, hkv, block_size=bs, seed=seed)
    kw = dict(kw)
    sel = random_selection(problem, kw.pop("granularity"), kw.pop("keep"), seed + 1, **kw)
    _check(problem, impl, sel, seed)


TOKEN_PROMPTS = [s for s in SELECTIONS if s[2]["granularity"] == "token" and max(s[1][2]) > 1]


@pytest.mark.parametrize("share", [0.0, 1e9], ids=["page_tiles", "token_tiles"])
@pytest.mark.parametrize("name, case, kw", TOKEN_PROMPTS, ids=[s[0] for s in TOKEN_PROMPTS])
def test_prompt_rows_under_token_lists_gather_pages_or_single_tokens_alike(name, case, kw, share, monkeypatch):
    """The twin reads a prompt tile under token lists as the pages holding its candidates or as
    exactly those tokens (``TOKEN_TILE_SHARE``, forced both ways here): both are the reference."""
    monkeypatch.setattr(torch_impl, "TOKEN_TILE_SHARE", share)
    test_selection_matches_reference(name, case, kw, "torch")


@pytest.mark.parametrize("impl", IMPLS)
def test_per_head_windows_and_dense_marks(impl):
    """Each (sequence, KV head) its own sink, window, list and dense mark, as a head split makes them."""
    seed = _seed()
    problem = make_problem([37, 70, 20], [9, 1, 20], 6, 3, block_size=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    sel = random_selection(problem, "token", 0.2, seed + 1)
    sel = Selection.build(3, 3, granularity="token", indices=sel.indices, counts=sel.counts,
                          sink=torch.randint(0, 6, (3, 3), generator=g), window=torch.randint(0, 12, (3, 3), generator=g),
                          dense=torch.rand(3, 3, generator=g) < 0.4)
    _check(problem, impl, sel, seed)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_with_nothing_selected_are_zero(impl):
    problem = make_problem([20, 9], [3, 1], 4, 2, block_size=8, seed=5)
    sel = Selection.build(2, 2)  # no lists, no window, no dense heads
    out = _check(problem, impl, sel, 5)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_full_selection_and_huge_window_equal_dense(impl):
    """Selecting every page, or a window longer than the context, gives the dense result."""
    problem = make_problem([37, 70], [1, 5], 6, 2, block_size=16, seed=3)
    pages = torch.tensor([-(-s // 16) for s in problem.plan.lens])
    width = int(pages.max())
    dense = torch.empty_like(problem.query)
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, dense, impl=impl)
    for sel in (Selection.build(2, 2, indices=torch.arange(width, dtype=torch.int32).expand(2, 2, width).contiguous(),
                                counts=pages[:, None].expand(2, 2).contiguous()),
                Selection.build(2, 2, window=1000),
                Selection.build(2, 2, dense=True)):
        out = torch.empty_like(problem.query)
        paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sel, impl=impl)
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)  # float32 summation order only


def test_bad_inputs_raise_one_clear_error():
    problem = make_problem([10], [1], 4, 2, seed=0)
    q3 = problem.query[:, :3]
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        paged_attention(q3, problem.kv, problem.plan, 1.0, q3.clone())
    with pytest.raises(ValueError, match="selection is for"):
        paged_attention(problem.query, problem.kv, problem.plan, 1.0, problem.query.clone(), Selection.build(2, 2))
    with pytest.raises(ValueError, match="multiple of 16"):
        Selection.build(1, 2, query_block=24)
    with pytest.raises(ValueError, match=r"must be \[seqs=1, kv_heads=2\]"):
        Selection.build(1, 2, window=torch.zeros(2, 2))
