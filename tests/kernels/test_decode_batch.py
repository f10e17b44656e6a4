"""The torch twin serves a decode-only batch under a selection in one pass (``torch_impl._decode_batch``):
every sequence's candidates (sinks, window, listed pages or tokens, dense heads) are gathered at
once and attended by two batched products. Checked against the float64 reference on fresh random
inputs, output poisoned, every unowned slot NaN, in every storage format (engine layouts and
quantized pages included), with per-(sequence, head) sinks, windows, lists and dense marks, and
at compacted positions against the row-by-row path it replaces."""
import pytest
import torch

from lcx_plugin.kernels.paged import Selection, paged_attention, torch_impl
from lcx_plugin.kernels.paged.reference import paged_attention_reference
from lcx_plugin.kernels.paged.rope import Rope

from .paged_cases import FORMATS, QUANT_FORMATS, make_problem, random_selection

#: Eight decoding sequences: one with only its own token, one inside a single page, long ones.
SEQ_LENS = [1, 7, 16, 33, 90, 151, 64, 120]


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run


def _per_head(g: torch.Generator, shape, high: int, zero_odds: float) -> torch.Tensor:
    x = torch.randint(0, high, shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < zero_odds, 0, x).to(torch.int32)


def _selection(problem, granularity: str, seed: int) -> Selection:
    g = torch.Generator().manual_seed(seed)
    shape = (problem.plan.num_seqs, problem.kv.num_kv_heads)
    return random_selection(problem, granularity, 0.3, seed, sink=_per_head(g, shape, 20, 0.3),
                            window=_per_head(g, shape, 40, 0.3), dense=torch.rand(shape, generator=g) < 0.15)


@pytest.mark.parametrize("granularity", ["page", "token"])
@pytest.mark.parametrize("fmt", FORMATS + QUANT_FORMATS)
def test_decode_batch_matches_reference_in_every_format(fmt, granularity):
    seed = _seed()
    dtype = torch.bfloat16 if fmt == "vllm-cpu-amx" else torch.float32
    problem = make_problem(SEQ_LENS, [1] * len(SEQ_LENS), 6, 3, head_dim=32, block_size=16, dtype=dtype,
                           seed=seed, fmt=fmt)
    sel = _selection(problem, granularity, seed + 1)
    expected = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, sel)
    out = torch.full_like(problem.query, float("nan"))  # poisoned: every row must be written
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sel, impl="torch")
    assert not torch.isnan(out).any(), f"seed={seed}: rows left unwritten or NaN read from unowned slots"
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    err = (out.double() - expected).abs().max().item()
    assert err < tol, f"seed={seed}: max abs error {err:.3g}"


def test_decode_batch_takes_the_step_and_an_empty_row_is_zero():
    """The batched path serves decode-only steps (and only those); a row with no candidate is zero."""
    seed = _seed()
    problem = make_problem([30, 50], [1, 1], 4, 2, block_size=8, seed=seed)
    calls = []
    real = torch_impl._decode_batch
    try:
        torch_impl._decode_batch = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        out = torch.full_like(problem.query, float("nan"))
        paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, Selection.build(2, 2), impl="torch")
        mixed = make_problem([30, 50], [1, 4], 4, 2, block_size=8, seed=seed)
        paged_attention(mixed.query, mixed.kv, mixed.plan, mixed.scale, torch.empty_like(mixed.query),
                        Selection.build(2, 2, window=3), impl="torch")
    finally:
        torch_impl._decode_batch = real
    assert calls == [1], "the decode-only step, and not the step with a prompt chunk, takes the batched path"
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("granularity", ["page", "token"])
def test_decode_batch_at_compacted_positions_is_the_row_by_row_path(granularity, monkeypatch):
    """With RoPE re-applied at compacted positions (length extrapolation), the batched rows equal
    the per-sequence rows and tiles the twin builds for a mixed batch."""
    seed = _seed()
    problem = make_problem(SEQ_LENS, [1] * len(SEQ_LENS), 6, 3, head_dim=32, block_size=16, seed=seed)
    sel = _selection(problem, granularity, seed + 1)
    rope = Rope.standard(32)
    batched = torch.full_like(problem.query, float("nan"))
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, batched, sel, impl="torch", rope=rope)
    monkeypatch.setattr(torch_impl, "_decoding_only", lambda plan: False)
    rowwise = torch.full_like(problem.query, float("nan"))
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, rowwise, sel, impl="torch", rope=rope)
    torch.testing.assert_close(batched, rowwise, rtol=0, atol=2e-5, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("fmt", [f for f in QUANT_FORMATS if not f.startswith("mixed")])
def test_page_lists_over_quantized_pages_attend_whole_cells(fmt, monkeypatch):
    """Page lists alone (TokenSelect's page granularity) over quantized pages take the cell path
    (``_decode_page_lists``): each sequence's last page is only partly written, its tail NaN-scaled
    bytes, and the output must neither read it nor differ from the float64 reference."""
    seed = _seed()
    problem = make_problem(SEQ_LENS, [1] * len(SEQ_LENS), 6, 3, head_dim=32, block_size=16, seed=seed, fmt=fmt)
    sel = random_selection(problem, "page", 0.5, seed + 1)
    # Every head keeps at least its last page (a page list the engine's op could run).
    idx, cnt = sel.indices.clone(), sel.counts.clone()
    last = torch.tensor([-(-n // 16) - 1 for n in SEQ_LENS], dtype=torch.int32)
    for b in range(len(SEQ_LENS)):
        for h in range(3):
            listed = set(idx[b, h, 0, : cnt[b, h, 0]].tolist()) | {int(last[b])}
            row = sorted(listed)
            idx[b, h, 0, : len(row)] = torch.tensor(row, dtype=torch.int32) if row else idx[b, h, 0, :0]
            cnt[b, h, 0] = len(row)
    width = int(cnt.max())
    if idx.shape[3] < width:
        idx = torch.nn.functional.pad(idx, (0, width - idx.shape[3]))
    sel = Selection("page", idx, cnt, sel.sink, sel.window, sel.dense)
    assert sel.only_page_lists
    calls = []
    original = torch_impl._decode_page_lists
    monkeypatch.setattr(torch_impl, "_decode_page_lists", lambda *a: calls.append(1) or original(*a))
    expected = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, sel)
    out = torch.full_like(problem.query, float("nan"))
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sel, impl="torch")
    assert calls, "page lists over quantized pages must take the cell path"
    assert not torch.isnan(out).any(), f"seed={seed}: an unwritten slot was read"
    err = (out.double() - expected).abs().max().item()
    assert err < 2e-4, f"seed={seed}: max abs error {err:.3g}"
