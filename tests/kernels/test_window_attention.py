"""Sink + window attention over a cache that keeps only sinks and windows, plus the step's own keys
(the storage of streaming heads whose memory is saved), against two float64 oracles: its own
reference, and the ordinary paged reference with a window selection over a cache that kept
everything. Every position the storage does not keep is NaN, so reading one poisons the output."""
import pytest
import torch

from lcx_plugin.kernels.paged import Selection
from lcx_plugin.kernels.paged.reference import paged_attention_reference
from lcx_plugin.kernels.paged.window import cached_positions, window_attention, window_attention_reference

from .paged_cases import QUANT_FORMATS, make_problem

CASES = [
    # (seq_lens, q_lens, sink, window, block_size): chunks longer than the window, windows
    # straddling pages, sequences shorter than sink + window, decodes, no sink, one-token window.
    ([70, 37, 20, 9], [40, 1, 20, 1], 5, 11, 8),
    ([100, 64], [1, 1], 16, 32, 16),
    ([45, 30, 12], [45, 7, 3], 0, 9, 8),
    ([33, 50], [10, 1], 4, 1, 8),
    ([130], [64], 8, 24, 16),
    # decodes only (one batched pass): no sink, a 1-token sequence, contexts shorter than the sinks.
    ([25, 1, 60, 3], [1, 1, 1, 1], 0, 9, 8),
    ([5, 90, 17, 41], [1, 1, 1, 1], 8, 16, 8),
    ([200, 12, 77], [1, 5, 1], 4, 33, 16),
]


def _split_storage(problem, sink, window):
    """The step's keys/values, read back from the full cache, then every position the split storage
    would not hold poisoned with NaN (the chunk itself, and the gap between sinks and window)."""
    kv, plan = problem.kv, problem.plan
    hkv, d, bs = kv.num_kv_heads, kv.head_dim, kv.block_size
    keys = torch.empty(plan.num_tokens, hkv, d, dtype=problem.query.dtype)
    vals = torch.empty_like(keys)
    for b in range(plan.num_seqs):
        s, q, L = plan.starts[b], plan.q_len(b), plan.lens[b]
        c = L - q
        table = plan.block_table[b]
        for i in range(q):
            p = c + i
            for g in range(hkv):
                keys[s + i, g], vals[s + i, g] = kv.token(int(table[p // bs]), g, p % bs)
        kept = set(cached_positions(c, sink, window).tolist())
        drop = torch.tensor([p for p in range(L) if p not in kept], dtype=torch.long)
        if drop.numel():
            slots = table[drop // bs].long() * bs + drop % bs
            nan = torch.full((drop.numel(), hkv, d), float("nan"), dtype=keys.dtype)
            kv.write(nan, nan, slots)
    return keys, vals


@pytest.mark.parametrize("row_tile", [256, 7, 1], ids=["one-tile", "tiles-of-7", "row-by-row"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_window_attention_matches_both_references(case, row_tile):
    seq_lens, q_lens, sink, window, bs = case
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    problem = make_problem(seq_lens, q_lens, 6, 2, head_dim=32, block_size=bs, seed=seed)
    selection = Selection.build(len(seq_lens), 2, sink=sink, window=window)
    full = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, selection)
    keys, vals = _split_storage(problem, sink, window)
    own = window_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, sink, window, keys, vals)
    out = torch.full_like(problem.query, float("nan"))
    window_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sink, window, keys, vals,
                     row_tile=row_tile)
    assert not torch.isnan(out).any(), f"seed={seed}: a dropped position was read, or a row left unwritten"
    assert (own - full).abs().max() < 1e-9, f"seed={seed}: the two references disagree"
    assert (out.double() - full).abs().max() < 2e-4, f"seed={seed}"


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_window_attention_over_quantized_pages(case, fmt):
    """Streaming heads on int8/int4 pages (decode rows attend on the codes): against the float64
    reference reading the same pages, with the dropped positions poisoned."""
    seq_lens, q_lens, sink, window, bs = case
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    problem = make_problem(seq_lens, q_lens, 6, 2, head_dim=32, block_size=bs, seed=seed, fmt=fmt)
    keys, vals = _split_storage(problem, sink, window)
    want = window_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, sink, window, keys, vals)
    out = torch.full_like(problem.query, float("nan"))
    window_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sink, window, keys, vals)
    assert not torch.isnan(out).any(), f"seed={seed}: a dropped position was read, or a row left unwritten"
    assert (out.double() - want).abs().max() < 2e-4, f"seed={seed}"


def test_bf16_cache():
    problem = make_problem([70, 9], [40, 1], 4, 1, head_dim=64, block_size=16, dtype=torch.bfloat16, seed=3)
    keys, vals = _split_storage(problem, 4, 20)
    want = window_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, 4, 20, keys, vals)
    out = torch.empty_like(problem.query)
    window_attention(problem.query, problem.kv, problem.plan, problem.scale, out, 4, 20, keys, vals)
    assert (out.double() - want).abs().max() < 2e-2


def test_bad_inputs():
    problem = make_problem([10], [2], 4, 2, seed=0)
    k = torch.zeros(2, 2, 64)
    out = torch.empty_like(problem.query)
    with pytest.raises(ValueError, match="window >= 1"):
        window_attention(problem.query, problem.kv, problem.plan, problem.scale, out, 4, 0, k, k)
    with pytest.raises(ValueError, match="key/value"):
        window_attention(problem.query, problem.kv, problem.plan, problem.scale, out, 4, 8, k[:, :1], k[:, :1])
