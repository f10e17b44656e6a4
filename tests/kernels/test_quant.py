"""Quantized pages (int8, int4): round trips within their analytic bound, attention over them
against the float64 reference on the dequantized values, odd head dims and partial pages; the
torch twin and the Triton kernels (dequantize-on-load; the interpreter here, TRITON_INTERPRET=1).

Fresh random inputs every run (the seed is in each failure message); outputs poisoned with NaN
first; every cache byte nobody owns is 0xFF, whose bfloat16 scale reads as NaN.
"""
import pytest
import torch

from lcx_plugin.kernels.paged import paged_attention, quant, token_logits
from lcx_plugin.kernels.paged.reference import paged_attention_reference, token_logits_reference

from .paged_cases import QUANT_FORMATS, make_problem, random_selection

REL = 1e-5  # attention over quantized pages vs float64 on the same dequantized values (fp32)
IMPLS = ["torch", "triton"]
# Every format on the torch twin; on Triton's interpreter (slow) int8, the served int4 (rotated
# keys) and mixed pages, the other int4 layouts being covered there by the query-block test.
FORMAT_IMPLS = [(f, "torch") for f in QUANT_FORMATS] + [("int8-g0", "triton"), ("int4-g0-rot", "triton"),
                                                         ("mixed-g0", "triton")]


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _activations(shape, seed: int) -> torch.Tensor:
    """Gaussian rows with a per-channel bias and a few large outliers, like real keys."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2 + torch.randn(shape[-1], generator=g) * 3
    spikes = torch.rand(*shape, generator=g) < 0.01
    return torch.where(spikes, x * 20, x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim,group", [(64, 64), (64, 32), (65, 64), (33, 16), (7, 3), (128, 128)])
def test_round_trip_within_analytic_bound(bits, head_dim, group):
    seed = _seed()
    x = _activations((257, 3, head_dim), seed)
    rows = quant.encode(x, bits, group)
    assert rows.dtype == torch.uint8 and rows.shape[-1] == quant.row_bytes(head_dim, bits, group)
    back = quant.decode(rows, head_dim, bits, group)
    bound = quant.error_bound(rows, head_dim, bits, group)
    err = (back - x).abs()
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + bound * (1 << bits))  # float32 reconstruction
    worst = (err - bound - slack).max().item()
    assert worst <= 0, f"seed={seed}: round trip exceeds scale/2 by {worst:.3g}"
    # The bound itself is tight: the stored scale is the group's range over 2**bits - 1, rounded
    # outward (bfloat16: about 1 % of the range, and 2**-7 of the group's magnitude for the zero).
    xg = torch.nn.functional.pad(x, (0, -head_dim % group), value=float("nan"))
    xg = xg.view(*x.shape[:-1], -1, group)
    span = (torch.nan_to_num(xg, nan=-float("inf")).amax(-1) - torch.nan_to_num(xg, nan=float("inf")).amin(-1))
    mag = torch.nan_to_num(xg, nan=0.0).abs().amax(-1)  # the outward nudge is relative to the group's values
    ideal = ((span * 1.03 + mag * 2.0 ** -6) / ((1 << bits) - 1) / 2).repeat_interleave(group, -1)[..., :head_dim]
    assert (bound <= ideal + 1e-30).all(), f"seed={seed}: stored scales are looser than the group range"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim,group", [(64, 64), (64, 32), (65, 64), (33, 16), (7, 3)])
def test_attention_on_codes_equals_attention_on_dequantized_rows(bits, head_dim, group):
    """``scores`` and ``weighted_sum`` apply the scales to scores, never expanding the rows: they
    must equal the same products over ``decode``d rows, computed in float64 (padded last groups
    included)."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    keys = quant.encode(_activations((2, 3, 40, head_dim), seed), bits, group)
    values = quant.encode(_activations((2, 3, 40, head_dim), seed + 1), bits, group)
    query = torch.randn(2, 3, 4, head_dim, generator=g)
    probs = torch.softmax(torch.randn(2, 3, 4, 40, generator=g), -1)
    k64 = quant.decode(keys, head_dim, bits, group, torch.float64)
    v64 = quant.decode(values, head_dim, bits, group, torch.float64)
    want_s = query.double() @ k64.transpose(-1, -2)
    want_o = probs.double() @ v64
    got_s = quant.scores(query, quant.read_codes(keys, head_dim, bits, group))
    got_o = quant.weighted_sum(probs, quant.read_codes(values, head_dim, bits, group))
    assert got_s.shape == want_s.shape and got_o.shape == want_o.shape
    tol = 1e-4 * (1 + want_s.abs().max().item())
    assert (got_s.double() - want_s).abs().max().item() < tol, f"seed={seed}"
    assert (got_o.double() - want_o).abs().max().item() < 1e-4 * (1 + v64.abs().max().item()), f"seed={seed}"


def test_round_trip_detects_a_corrupted_code():
    """The bound check can fail: one flipped code byte breaks it."""
    x = _activations((16, 1, 64), 3)
    rows = quant.encode(x, 4, 64)
    rows[5, 0, 7] ^= 0x88
    err = (quant.decode(rows, 64, 4, 64) - x).abs()
    assert (err > quant.error_bound(rows, 64, 4, 64) * 1.01).any()


def test_constant_and_zero_rows_are_exact():
    x = torch.zeros(4, 2, 64)
    x[1] = 3.25
    x[2, 0] = -1e-3
    for bits in (8, 4):
        back = quant.decode(quant.encode(x, bits, 32), 64, bits, 32)
        assert torch.allclose(back, x, atol=1e-2 * x.abs().max().item() + 1e-9, rtol=0)
        assert not back.isnan().any()


@pytest.mark.parametrize("head_dim,bits,group,expected", [(64, 8, 64, 1.85), (64, 4, 64, 3.3), (128, 4, 128, 3.3)])
def test_bytes_per_token_against_bf16(head_dim, bits, group, expected):
    """Scales and zero points included: the issue's capacity ratios against a bf16 cache."""
    ratio = 2 * head_dim / quant.row_bytes(head_dim, bits, group)
    assert ratio >= expected, f"int{bits} g{group}: {ratio:.3f}x"


CASES = [  # (seq_lens, query_lens, num_heads, num_kv_heads, block_size, head_dim)
    ([1, 37, 70], [1, 1, 1], 6, 2, 16, 64),  # decode, partial pages
    ([40, 50, 21], [8, 50, 3], 6, 2, 16, 64),  # chunked prefill with context
    ([19, 45], [19, 1], 4, 1, 16, 65),  # odd head dim (int4: a half-used last byte)
    ([33, 9], [1, 9], 3, 3, 8, 33),
]


@pytest.mark.parametrize("fmt,impl", FORMAT_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_attention_over_quantized_pages_matches_reference(fmt, case, impl):
    seq_lens, query_lens, hq, hkv, bs, d = case
    seed = _seed()
    p = make_problem(seq_lens, query_lens, hq, hkv, head_dim=d, block_size=bs, seed=seed, fmt=fmt)
    expected = paged_attention_reference(p.query, p.kv, p.plan, p.scale)  # float64 on the dequantized values
    out = torch.full_like(p.query, float("nan"))
    paged_attention(p.query, p.kv, p.plan, p.scale, out, impl=impl)
    assert not out.isnan().any(), f"seed={seed}: unwritten rows, or a read of a byte nobody owns"
    rel = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel <= REL, f"seed={seed}: relative error {rel:.3g}"


@pytest.mark.parametrize("fmt,impl", FORMAT_IMPLS)
@pytest.mark.parametrize("granularity", ["page", "token"])
def test_selected_attention_over_quantized_pages(fmt, granularity, impl):
    seed = _seed()
    p = make_problem([100, 9, 57], [1, 1, 1], 6, 2, seed=seed, fmt=fmt)
    sel = random_selection(p, granularity, 0.4, seed + 1, sink=4, window=8)
    expected = paged_attention_reference(p.query, p.kv, p.plan, p.scale, sel)
    out = torch.full_like(p.query, float("nan"))
    paged_attention(p.query, p.kv, p.plan, p.scale, out, sel, impl=impl)
    assert not out.isnan().any(), f"seed={seed}"
    rel = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel <= REL, f"seed={seed}: relative error {rel:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", ["int8-g0", "int4-g16"])
@pytest.mark.parametrize("granularity", ["page", "token"])
def test_quantized_query_blocks_and_dense_marks(fmt, granularity, impl):
    """Chunked prefill with a list per query block of 16 rows, per-head sinks, windows and dense
    marks, over an odd head dim: every pass of the kernel reads quantized tiles."""
    seed = _seed()
    p = make_problem([60, 44], [40, 44], 4, 2, head_dim=65, block_size=8, seed=seed, fmt=fmt)
    g = torch.Generator().manual_seed(seed)
    sel = random_selection(p, granularity, 0.3, seed + 1, query_block=16,
                           sink=torch.randint(0, 5, (2, 2), generator=g), window=torch.randint(0, 9, (2, 2), generator=g),
                           dense=torch.tensor([[True, False], [False, False]]))
    expected = paged_attention_reference(p.query, p.kv, p.plan, p.scale, sel)
    out = torch.full_like(p.query, float("nan"))
    paged_attention(p.query, p.kv, p.plan, p.scale, out, sel, impl=impl)
    assert not out.isnan().any(), f"seed={seed}"
    rel = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel <= REL, f"seed={seed}: relative error {rel:.3g}"


@pytest.mark.parametrize("fmt,impl", FORMAT_IMPLS)
@pytest.mark.parametrize("head_dim", [64, 65])
def test_token_scores_read_quantized_keys(fmt, head_dim, impl):
    seed = _seed()
    p = make_problem([70, 33], [1, 1], 6, 2, head_dim=head_dim, seed=seed, fmt=fmt)
    expected = token_logits_reference(p.query, p.kv, p.plan, p.scale)
    got = token_logits(p.query, p.kv, p.plan, p.scale, impl=impl)
    live = torch.isfinite(expected)
    assert torch.equal(live, torch.isfinite(got)), f"seed={seed}"
    assert torch.allclose(got[live].double(), expected[live], rtol=1e-5, atol=1e-4), f"seed={seed}"


def test_quantized_attention_is_close_to_full_precision():
    """Not just self-consistent: int8 pages give nearly bf16 attention, int4 a bounded error."""
    seed = _seed()
    full = make_problem([300, 64], [1, 64], 6, 2, seed=seed)
    outs = {}
    for fmt in ("plain", "int8-g0", "int4-g0"):
        p = make_problem([300, 64], [1, 64], 6, 2, seed=seed, fmt=fmt)
        outs[fmt] = paged_attention(p.query, p.kv, p.plan, p.scale, torch.empty_like(p.query), impl="torch")
    assert torch.equal(full.query, p.query)
    base = outs["plain"]
    err = {f: ((outs[f] - base).norm() / base.norm()).item() for f in ("int8-g0", "int4-g0")}
    assert err["int8-g0"] < 0.01 and err["int4-g0"] < 0.15 and err["int8-g0"] < err["int4-g0"] / 4, f"seed={seed}: {err}"


def test_write_skips_padding_slots_and_rejects_bad_buffers():
    kv = quant.quantized(torch.full((2, 1, 16, 2 * quant.row_bytes(64, 4, 64)), 255, dtype=torch.uint8), 64, 4, 64)
    before = kv.raw.clone()
    kv.write(torch.randn(3, 1, 64), torch.randn(3, 1, 64), torch.tensor([-1, 17, -1]))
    changed = (kv.raw != before).any(-1)
    assert changed.sum().item() == 1 and bool(changed[1, 0, 1])
    with pytest.raises(ValueError, match="uint8 cache"):
        quant.quantized(torch.zeros(2, 1, 16, 70, dtype=torch.uint8), 64, 4, 64)
    with pytest.raises(ValueError, match="contiguous"):
        quant.quantized(torch.zeros(2, 1, 16, 72)[..., :36], 64, 4, 64)
    as_bf16 = torch.zeros(2, 1, 16, quant.row_bytes(64, 4, 64), dtype=torch.bfloat16)  # how vLLM hands it over
    assert quant.quantized(as_bf16, 64, 4, 64).raw.shape == (2, 1, 16, 2 * quant.row_bytes(64, 4, 64))
    with pytest.raises(ValueError, match="4- or 8-bit"):
        quant.row_bytes(64, 2, 64) and quant.check_params(64, 2, 64)


def test_hadamard_rotation_is_orthonormal_and_keeps_dot_products():
    h = quant.hadamard(64, dtype=torch.float64)
    assert torch.allclose(h @ h, torch.eye(64, dtype=torch.float64), atol=1e-12) and torch.equal(h, h.T)
    with pytest.raises(ValueError, match="power-of-two"):
        quant.hadamard(65)
    assert quant.rotates_keys(64, 4) and not quant.rotates_keys(64, 8) and not quant.rotates_keys(80, 4)


def test_rotated_keys_read_back_unrotated_and_cut_int4_error_on_outlier_channels():
    """Keys with a few large channels (as real keys have): the rotated format reads back the keys
    themselves (not their rotation), with a smaller error than the unrotated one."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(512, 2, 64, generator=g)
    k[..., :3] *= 12  # outlier channels
    v = torch.randn(512, 2, 64, generator=g)
    err = {}
    for rotate in (False, True):
        k_hat, v_hat = quant.round_trip(k, v, 4, 64, rotate)
        err[rotate] = ((k_hat - k).norm() / k.norm()).item()
        assert ((v_hat - v).norm() / v.norm()).item() < 0.12
    assert err[True] < 0.7 * err[False] and err[True] < 0.12, f"seed={seed}: {err}"
