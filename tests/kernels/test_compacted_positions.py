"""Compacted positions: the torch twin and the Triton kernel (here in the interpreter) re-rotate
what each row reads so that its candidates sit side by side (``kernels/paged/torch_impl.py``,
``triton_impl.py``), against a float64 reference that applies RoPE at those positions to the
**pre-RoPE** queries and keys (``compacted_attention_reference``).

Fresh random inputs every run (the seed is in the failure message); outputs poisoned with NaN
first; every cache slot nobody owns holds NaN.
"""
import pytest
import torch

from lcx_plugin.kernels.paged import BatchPlan, Selection, paged_attention
from lcx_plugin.kernels.paged.reference import compacted_attention_reference
from lcx_plugin.kernels.paged import torch_impl
from lcx_plugin.kernels.paged import rope as rope_module
from lcx_plugin.kernels.paged.rope import Rope

from .paged_cases import Problem, empty_format, random_selection

TOL = 2e-4
ROPES = {
    "neox_default": Rope.standard(64, 10000.0),
    "neox_theta_1e5_linear_x4": Rope.standard(64, 100000.0, position_scale=4.0),
    "gptj_theta_5e5_partial": Rope.standard(64, 500000.0, rotary_dim=32, neox=False),
}


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _problem(seq_lens, query_lens, hq, hkv, bs, rope, seed, head_dim=64, fmt="plain"):
    """Pre-RoPE q0/k0/v, and what the engine hands the kernel: a cache of keys rotated at their
    absolute positions and queries rotated at theirs."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-s // bs) for s in seq_lens]
    num_blocks = sum(pages) + 2
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(seq_lens), max(pages) + 1), num_blocks - 1, dtype=torch.int32)
    kv = empty_format(fmt, num_blocks, hkv, bs, head_dim, torch.float32)
    keys0, values, used = [], [], 0
    for b, (s, n) in enumerate(zip(seq_lens, pages)):
        table[b, :n] = perm[used: used + n].to(torch.int32)
        used += n
        slots = table[b, torch.arange(s) // bs].long() * bs + torch.arange(s) % bs
        k0, v = torch.randn(s, hkv, head_dim, generator=g), torch.randn(s, hkv, head_dim, generator=g)
        kv.write(rope.rotate(k0, torch.arange(s)[:, None]), v, slots)
        keys0.append(k0)
        values.append(v)
    q0 = torch.randn(sum(query_lens), hq, head_dim, generator=g)
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens)])
    query = rope.rotate(q0, positions[:, None])
    return q0, query, keys0, values, kv, BatchPlan.from_lists(query_lens, seq_lens, table), head_dim ** -0.5


def _selection(query, plan, kv, granularity, keep, seed, **kw):
    return random_selection(Problem(query, kv, plan, 1.0), granularity, keep, seed, **kw)


# (name, seq_lens, query_lens, hq, hkv, block, granularity, keep, selection kwargs)
CASES = [
    ("decode_token_lists", [90, 41, 300], [1, 1, 1], 6, 2, 16, "token", 0.15, dict(sink=4, window=8)),
    ("decode_page_lists", [90, 41, 300], [1, 1, 1], 6, 2, 16, "page", 0.3, dict(sink=4, window=8)),
    ("chunked_prefill_page_lists", [120, 75], [40, 75], 4, 2, 8, "page", 0.3, dict(sink=3, window=10)),
    ("chunked_prefill_token_lists", [120, 75], [33, 20], 4, 1, 8, "token", 0.2, dict(sink=2, window=5)),
    ("query_blocks", [100, 64], [48, 64], 4, 2, 8, "page", 0.4, dict(sink=1, window=6, query_block=16)),
    ("long_decode_far_positions", [3000], [1], 3, 1, 64, "token", 0.02, dict(sink=16, window=32)),
    # Lists only, no window (page lists as an engine's own op takes them): a row may not list itself.
    ("decode_page_lists_no_window", [90, 41, 300], [1, 1, 1], 6, 2, 16, "page", 0.4, dict(sink=0, window=0)),
    ("prefill_token_lists_no_window", [120, 75], [33, 20], 4, 1, 8, "token", 0.3, dict(sink=0, window=0)),
    ("decode_token_lists_no_window", [90, 300], [1, 1], 6, 2, 16, "token", 0.2, dict(sink=2, window=0)),
    # A list per block of 16 prompt rows, sparse enough that the twin gathers single tokens.
    ("prefill_token_query_blocks", [200, 130], [96, 130], 4, 2, 8, "token", 0.1, dict(sink=2, window=6, query_block=16)),
]


def _check_against_reference(case, rope_name, impl, tiles=None):
    name, lens, qlens, hq, hkv, bs, gran, keep, kw = case
    rope, seed = ROPES[rope_name], _seed()
    q0, query, keys0, values, kv, plan, scale = _problem(lens, qlens, hq, hkv, bs, rope, seed)
    sel = _selection(query, plan, kv, gran, keep, seed + 1, **kw)
    if tiles is not None:  # which kind of row tile the twin built, for the caller to check
        tiles.extend(t for seq in torch_impl._prepare(sel, plan, bs, True) if isinstance(seq, list) for t in seq)
    expected = compacted_attention_reference(q0, keys0, values, plan, scale, sel, rope, bs)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, kv, plan, scale, out, sel, impl=impl, rope=rope)
    assert not torch.isnan(out).any(), f"seed={seed}: rows unwritten or NaN read"
    err = (out.double() - expected).abs().max().item()
    assert err < TOL, f"seed={seed}: max abs error {err:.3g}"
    # And it is not the uncompacted attention: the positions really moved (the twin's, quicker here).
    plain = torch.empty_like(query)
    paged_attention(query, kv, plan, scale, plain, sel, impl="torch")
    assert (plain.double() - expected).abs().max().item() > 10 * TOL, f"seed={seed}: compaction changed nothing"


@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_compacted_attention_matches_the_float64_reference(case, rope_name):
    _check_against_reference(case, rope_name, "torch")


TOKEN_PREFILL = [c for c in CASES if c[6] == "token" and max(c[2]) > 1]


@pytest.mark.parametrize("share, kind", [(0.0, "page"), (1e9, "token")], ids=["page_tiles", "token_tiles"])
@pytest.mark.parametrize("case", TOKEN_PREFILL, ids=[c[0] for c in TOKEN_PREFILL])
def test_prompt_rows_under_token_lists_gather_pages_or_single_tokens_alike(case, share, kind, monkeypatch):
    """The twin reads a prompt tile under token lists either as the pages holding its candidates
    or as exactly those tokens (``TOKEN_TILE_SHARE`` decides; forced both ways here): the same
    compacted attention."""
    monkeypatch.setattr(torch_impl, "TOKEN_TILE_SHARE", share)
    tiles = []
    _check_against_reference(case, "neox_default", "torch", tiles)
    built = {"token" if t.offsets is not None else "page" for t in tiles if t.mask is not None or t.band is not None}
    assert built == {kind}, f"built {built} tiles"


#: The interpreter runs a program at a time: a spread of the cases above, each rope style once or more.
TRITON_CASES = [(CASES[0], "neox_default"), (CASES[2], "gptj_theta_5e5_partial"),
                (CASES[4], "neox_theta_1e5_linear_x4"), (CASES[5], "neox_default"),
                (CASES[7], "gptj_theta_5e5_partial"), (CASES[8], "neox_theta_1e5_linear_x4")]


@pytest.mark.parametrize("case, rope_name", TRITON_CASES, ids=[f"{c[0]}-{r}" for c, r in TRITON_CASES])
def test_the_triton_kernel_matches_the_float64_reference(case, rope_name):
    _check_against_reference(case, rope_name, "triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_per_head_windows_and_dense_marks(impl):
    """Each (sequence, KV head) its own sink, window, list and dense mark, as a head split makes them."""
    rope, seed = ROPES["neox_default"], _seed()
    q0, query, keys0, values, kv, plan, scale = _problem([70, 130, 20], [9, 1, 20], 6, 3, 8, rope, seed)
    g = torch.Generator().manual_seed(seed)
    base = _selection(query, plan, kv, "token", 0.2, seed + 1)
    sel = Selection.build(3, 3, granularity="token", indices=base.indices, counts=base.counts,
                          sink=torch.randint(0, 6, (3, 3), generator=g), window=torch.randint(1, 12, (3, 3), generator=g),
                          dense=torch.rand(3, 3, generator=g) < 0.4)
    expected = compacted_attention_reference(q0, keys0, values, plan, scale, sel, rope, 8)
    out = torch.full_like(query, float("nan"))
    paged_attention(query, kv, plan, scale, out, sel, impl=impl, rope=rope)
    assert (out.double() - expected).abs().max().item() < TOL, f"seed={seed}"


@pytest.mark.parametrize("qlens, impl", [([1, 1], "torch"), ([37, 5], "torch"), ([37, 5], "triton")],
                         ids=["decode-torch", "prefill-torch", "prefill-triton"])
def test_a_selection_that_moves_nothing_is_exactly_dense(qlens, impl):
    """Dense marks, every token listed, or a window covering the context: identity positions, and
    the output equals the same selection read without RoPE, and dense attention, to float32
    rounding."""
    rope, seed = ROPES["neox_default"], _seed()
    _, query, _, _, kv, plan, scale = _problem([37, 70], qlens, 6, 2, 16, rope, seed)
    dense = torch.empty_like(query)
    paged_attention(query, kv, plan, scale, dense, impl="torch")
    everything = torch.arange(70, dtype=torch.int32).expand(2, 2, 70).contiguous()
    counts = torch.tensor(plan.lens, dtype=torch.int32)[:, None].expand(2, 2).contiguous()
    for sel in (Selection.build(2, 2, dense=True),
                Selection.build(2, 2, granularity="token", indices=everything, counts=counts, window=1),
                Selection.build(2, 2, window=1000)):
        out = torch.full_like(query, float("nan"))
        paged_attention(query, kv, plan, scale, out, sel, impl=impl, rope=rope)
        unrotated = torch.empty_like(query)
        paged_attention(query, kv, plan, scale, unrotated, sel, impl=impl)
        # Each path sums in its own order (float32 differences up to 1.2e-6 seen on outputs of about
        # 1, Triton 3 seeds in 40; without RoPE a decode page selection gathers its candidates page
        # by page, with RoPE position by position), so float32 rounding is allowed and nothing
        # more: a token turned, read twice or missed moves outputs by far more than 1e-5.
        torch.testing.assert_close(out, unrotated, rtol=0, atol=1e-5, msg=lambda m: f"seed={seed}: {sel}: {m}")
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-5, msg=lambda m: f"seed={seed}: {sel}: {m}")


def test_the_triton_kernel_reads_int8_pages_at_compacted_positions_as_the_twin_does():
    """Quantized pages dequantized on load, then turned: the same arithmetic as the torch twin's
    on the same dequantized keys (the float64 reference holds the unquantized ones)."""
    rope, seed = ROPES["gptj_theta_5e5_partial"], _seed()
    _, query, _, _, kv, plan, scale = _problem([90, 160], [1, 16], 6, 2, 16, rope, seed, fmt="int8-g0")
    sel = _selection(query, plan, kv, "page", 0.3, seed + 1, sink=4, window=8)
    twin, triton_out = torch.full_like(query, float("nan")), torch.full_like(query, float("nan"))
    paged_attention(query, kv, plan, scale, twin, sel, impl="torch", rope=rope)
    paged_attention(query, kv, plan, scale, triton_out, sel, impl="triton", rope=rope)
    assert (triton_out - twin).abs().max().item() < 1e-5, f"seed={seed}"
    plain = torch.empty_like(query)
    paged_attention(query, kv, plan, scale, plain, sel, impl="torch")
    assert (plain - twin).abs().max().item() > 10 * TOL, f"seed={seed}: compaction changed nothing"


def test_the_triton_kernel_refuses_what_it_cannot_turn():
    """Hadamard-rotated int4 keys (RoPE does not commute with the rotation) and a rotated width
    that is not a power of two: one clear error that names the twin."""
    rope = ROPES["neox_default"]
    _, query, _, _, kv, plan, scale = _problem([40], [8], 4, 2, 8, rope, 0, fmt="int4-g0-rot")
    out = torch.empty_like(query)
    with pytest.raises(NotImplementedError, match="Hadamard.*torch twin"):
        paged_attention(query, kv, plan, scale, out, Selection.build(1, 2, sink=4, window=4), impl="triton", rope=rope)
    odd = Rope.standard(64, 10000.0, rotary_dim=48)
    _, query, _, _, kv, plan, scale = _problem([40], [8], 4, 2, 8, odd, 0)
    with pytest.raises(NotImplementedError, match="power of two.*torch twin"):
        paged_attention(query, kv, plan, scale, out, Selection.build(1, 2, sink=4, window=4), impl="triton", rope=odd)


def test_rope_rotation_composes_and_matches_the_pairing_style():
    """R(a) R(b) = R(a + b) for both styles; neox pairs dimension i with i + r/2, GPT-J 2i with 2i+1."""
    x = torch.randn(5, 64, dtype=torch.float64)
    for rope in ROPES.values():
        torch.testing.assert_close(rope.rotate(rope.rotate(x, torch.tensor(7.0)), torch.tensor(-3.0)),
                                   rope.rotate(x, torch.tensor(4.0)))
        torch.testing.assert_close(rope.rotate(x, torch.tensor(0.0)), x, rtol=0, atol=0)
    neox, gptj = Rope.standard(4, 1.0, neox=True), Rope.standard(4, 1.0, neox=False)
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    half_pi = torch.tensor(torch.pi / 2 / 1.0)  # inv_freq[0] = 1: a quarter turn
    torch.testing.assert_close(neox.rotate(e0, half_pi), torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(gptj.rotate(e0, half_pi), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("rope_name", list(ROPES))
def test_integer_shifts_read_the_same_cos_and_sin_from_the_table(rope_name):
    """Integer shifts take cos and sin from a table built from the same float64 angles (grown as
    farther shifts come, computed directly past ``TABLE_REACH``): bit for bit the direct rotation,
    forward and backward, for float32 and float64 inputs."""
    rope, seed = ROPES[rope_name], _seed()
    g = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 9, 64, generator=g).to(dtype)
        for reach in (5, 3000, 70000, rope_module.TABLE_REACH, 3 * rope_module.TABLE_REACH):
            shift = torch.randint(-reach, reach + 1, (4, 9), generator=g)
            assert torch.equal(rope.rotate(x, shift), rope.rotate(x, shift.double())), f"seed={seed}, reach {reach}"
