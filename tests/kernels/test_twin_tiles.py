"""The torch twin builds a long prefill's row tiles in groups (``torch_impl._prepare_tiles``): on
fresh random selections, every tile is the one ``_prepare_tile`` builds alone (the same cells and
the same mask, bit for bit), and attention through the grouped tiles matches the float64
reference. Sequences are long enough for more tiles than one group holds."""
import pytest
import torch

from lcx_plugin.kernels.paged import paged_attention
from lcx_plugin.kernels.paged import torch_impl
from lcx_plugin.kernels.paged.reference import paged_attention_reference

from .paged_cases import make_problem, random_selection

# (name, seq_lens, query_lens, granularity, query_block): chunks after context, a last page cut
# short (its tail unwritten), a sequence with more tiles than ``TILE_GROUP``, one list for all rows.
CASES = [
    ("pages_per_block", [700, 333], [700, 101], "page", 16),
    ("tokens_per_block", [600, 90], [480, 90], "token", 32),
    ("pages_one_list", [650], [650], "page", 0),
    ("tokens_one_list", [500, 77], [200, 77], "token", 0),
]


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run


def _per_head(g: torch.Generator, nseq: int, hkv: int, high: int, zero_odds: float) -> torch.Tensor:
    x = torch.randint(0, high, (nseq, hkv), generator=g)
    return torch.where(torch.rand(nseq, hkv, generator=g) < zero_odds, 0, x).to(torch.int32)


def _problem(case, seed):
    _, seq_lens, query_lens, granularity, query_block = case
    problem = make_problem(seq_lens, query_lens, 6, 3, head_dim=16, block_size=16, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    n, hkv = len(seq_lens), 3
    sel = random_selection(problem, granularity, 0.15, seed=seed + 2, sink=_per_head(g, n, hkv, 40, 0.3),
                           window=_per_head(g, n, hkv, 90, 0.3), dense=torch.rand(n, hkv, generator=g) < 0.15,
                           query_block=query_block)
    return problem, sel


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("draw", range(4))
def test_grouped_tiles_are_the_tiles_built_one_by_one(case, draw, monkeypatch):
    monkeypatch.setattr(torch_impl, "TOKEN_TILE_SHARE", 0.0)  # page tiles only (token tiles: test_paged_attention)
    seed = _seed()
    problem, sel = _problem(case, seed)
    plan, bs = problem.plan, problem.kv.block_size
    grouped = torch_impl._prepare(sel, plan, bs)
    if case[0] == "pages_per_block":  # more tiles than one group holds
        assert grouped[0] is None or len(grouped[0]) > torch_impl.TILE_GROUP
    tile = min(torch_impl.ROW_TILE, sel.query_block) if sel.query_block else torch_impl.ROW_TILE
    for b in range(plan.num_seqs):
        qlen, seq_len = plan.q_len(b), plan.lens[b]
        if grouped[b] is None:
            assert bool(sel.dense[b].all()), f"seed={seed}"
            continue
        blocks = plan.block_table[b, : -(-seq_len // bs)].long()
        alone = [torch_impl._prepare_tile(sel, b, blocks, seq_len, seq_len - qlen, range(i, min(i + tile, qlen)), bs)
                 for i in range(0, qlen, tile)]
        assert len(grouped[b]) == len(alone), f"seed={seed}"
        for got, want in zip(grouped[b], alone):
            where = f"seed={seed}, sequence {b}, tile at row {want.start}"
            assert (got.start, got.rows, got.every_row_sees_one) == (want.start, want.rows, want.every_row_sees_one), where
            assert torch.equal(got.blocks, want.blocks), where
            assert (got.mask is None) == (want.mask is None) and (got.mask is None or torch.equal(got.mask, want.mask)), where
            assert (got.tail is None) == (want.tail is None) and (got.tail is None or torch.equal(got.tail, want.tail)), where


@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_grouped_tiles_attend_as_the_float64_reference(case):
    seed = _seed()
    problem, sel = _problem(case, seed)
    expected = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, sel)
    out = torch.full_like(problem.query, float("nan"))  # poisoned: every row must be written
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sel, impl="torch")
    assert not torch.isnan(out).any(), f"seed={seed}: rows left unwritten or NaN read from unowned slots"
    err = (out.double() - expected).abs().max().item()
    assert err < 2e-4, f"seed={seed}: max abs error {err:.3g}"
