"""The native CPU decode op over quantized pages (``kernels/paged/cpu_op.c``): against a float64
reference on fresh random caches, output poisoned first, padding and out-of-range spans; wired
into every quantized decode path of the twin (the same results with it off); and the fallback
when no compiler builds it."""
import logging

import pytest
import torch

from lcx_plugin.kernels.paged import Selection, cpu_op, paged_attention, quant
from lcx_plugin.kernels.paged.window import window_attention

from .paged_cases import QUANT_FORMATS, make_problem, random_selection

pytestmark = pytest.mark.skipif(not cpu_op.available(), reason="no C compiler builds the native op here")


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _cache(g, num_blocks, hkv, bs, d, bits, group):
    kv = quant.quantized(torch.zeros(num_blocks, hkv, bs, 2 * quant.row_bytes(d, bits, group), dtype=torch.uint8),
                         d, bits, group)
    k = torch.randn(num_blocks * bs, hkv, d, generator=g) * 2
    kv.write(k, torch.randn(num_blocks * bs, hkv, d, generator=g), torch.arange(num_blocks * bs))
    return kv


def _random_spans(g, n, hkv, w, num_blocks, bs):
    blk = torch.randint(0, num_blocks, (n, hkv, w), generator=g)
    lo = torch.randint(0, bs, (n, hkv, w), generator=g)
    hi = torch.minimum(lo + torch.randint(0, bs + 1, (n, hkv, w), generator=g), torch.tensor(bs))
    blk = torch.where(torch.rand(n, hkv, w, generator=g) < 0.2, -1, blk)  # padding spans
    spans = torch.stack([blk, lo, hi], -1).to(torch.int32)
    spans[0, 0, :, 0] = -1  # a row with no candidate
    return spans


def _reference(query, kv, spans, scale, own_k=None, own_v=None):
    n, hq, d = query.shape
    hkv = kv.num_kv_heads
    group = hq // hkv
    r = kv.row_bytes
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    for i in range(n):
        for h in range(hkv):
            rows = [kv.raw[int(b), h, t] for b, lo, hi in spans[i, h].tolist() if b >= 0 for t in range(lo, hi)]
            ks = [quant.decode(x[:r], d, kv.bits, kv.group_size, torch.float64) for x in rows]
            vs = [quant.decode(x[r:], d, kv.bits, kv.group_size, torch.float64) for x in rows]
            if own_k is not None:
                ks.append(own_k[i, h].double())
                vs.append(own_v[i, h].double())
            if not ks:
                continue
            k, v = torch.stack(ks), torch.stack(vs)
            for j in range(group):
                p = torch.softmax(scale * (k @ query[i, h * group + j].double()), 0)
                out[i, h * group + j] = p @ v
    return out


@pytest.mark.parametrize("own", [False, True], ids=["cache-only", "with-own-token"])
@pytest.mark.parametrize("bits,d,group", [(8, 64, 64), (8, 40, 16), (4, 64, 64), (4, 32, 12), (4, 7, 3)])
def test_op_matches_float64_reference(bits, d, group, own):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    n, hkv, hq, bs, num_blocks, w = 5, 2, 6, 8, 9, 6
    kv = _cache(g, num_blocks, hkv, bs, d, bits, group)
    spans = _random_spans(g, n, hkv, w, num_blocks, bs)
    query = torch.randn(n, hq, d, generator=g)
    own_k = torch.randn(n, hkv, d, generator=g) if own else None
    own_v = torch.randn(n, hkv, d, generator=g) if own else None
    out = torch.full((n, hq, d), float("nan"))  # poisoned: every row must be written
    cpu_op.decode_codes(query, kv, spans, d ** -0.5, out, own_k, own_v)
    expected = _reference(query, kv, spans, d ** -0.5, own_k, own_v)
    assert not torch.isnan(out).any(), f"seed={seed}: rows left unwritten"
    err = (out.double() - expected).abs().max().item()
    assert err < 2e-5, f"seed={seed}: max abs error {err:.3g}"


def test_spans_shared_by_every_head_equal_the_same_spans_per_head():
    g = torch.Generator().manual_seed(_seed())
    kv = _cache(g, 6, 3, 16, 64, 8, 64)
    shared = _random_spans(g, 4, 1, 5, 6, 16)[:, 0]
    query = torch.randn(4, 9, 64, generator=g)
    a = cpu_op.decode_codes(query, kv, shared, 0.125)
    b = cpu_op.decode_codes(query, kv, shared[:, None].expand(4, 3, 5, 3), 0.125)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_spans_and_buffers_raise_one_clear_error():
    g = torch.Generator().manual_seed(0)
    kv = _cache(g, 4, 1, 8, 64, 8, 64)
    query = torch.randn(2, 3, 64)
    good = torch.tensor([[[1, 0, 8]], [[2, 3, 5]]], dtype=torch.int32)
    cpu_op.decode_codes(query, kv, good, 0.125)
    for bad in ([[[4, 0, 8]], [[2, 3, 5]]], [[[1, 0, 9]], [[2, 3, 5]]], [[[1, -1, 3]], [[2, 3, 5]]]):
        with pytest.raises(ValueError, match="outside the cache"):
            cpu_op.decode_codes(query, kv, torch.tensor(bad, dtype=torch.int32), 0.125)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_op.decode_codes(query, kv, good, 0.125, out=torch.empty(2, 3, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="spans must be"):
        cpu_op.decode_codes(query, kv, good[:, None].expand(2, 2, 1, 3), 0.125)


SEQ_LENS = [1, 7, 16, 33, 90, 151, 64, 120]


def _both_ways(monkeypatch, run):
    """``run()`` with the op, counting its calls, then with it off (the twin's torch path)."""
    calls = []
    real = cpu_op.decode_codes
    monkeypatch.setattr(cpu_op, "decode_codes", lambda *a, **k: calls.append(1) or real(*a, **k))
    with_op = run()
    monkeypatch.setenv("LCX_CPU_OP", "0")
    without = run()
    return with_op, without, len(calls)


@pytest.mark.parametrize("granularity", ["page", "token", "page-lists", "dense"])
@pytest.mark.parametrize("fmt", [f for f in QUANT_FORMATS if not f.startswith("mixed")])
def test_every_quantized_decode_path_of_the_twin_takes_the_op(fmt, granularity, monkeypatch):
    seed = _seed()
    problem = make_problem(SEQ_LENS, [1] * len(SEQ_LENS), 6, 3, head_dim=32, block_size=16, seed=seed, fmt=fmt)
    if granularity == "dense":
        sel = None
    elif granularity == "page-lists":
        sel = random_selection(problem, "page", 0.5, seed + 1)
        empty = sel.counts == 0  # every head lists at least one page: give those page 0
        sel.indices[..., 0] = torch.where(empty, 0, sel.indices[..., 0])
        sel = Selection("page", sel.indices, torch.where(empty, 1, sel.counts), sel.sink, sel.window, sel.dense)
    else:
        g = torch.Generator().manual_seed(seed)
        shape = (problem.plan.num_seqs, 3)
        sel = random_selection(problem, granularity, 0.3, seed + 1, sink=torch.randint(0, 20, shape, generator=g),
                               window=torch.randint(1, 40, shape, generator=g))
    assert sel is None or sel.only_page_lists == (granularity == "page-lists")

    def run():
        out = torch.full_like(problem.query, float("nan"))
        return paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sel, impl="torch")

    with_op, without, calls = _both_ways(monkeypatch, run)
    assert calls == 1, "the quantized decode step must run as one native call"
    assert not torch.isnan(with_op).any()
    torch.testing.assert_close(with_op, without, rtol=0, atol=2e-5, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("fmt", [f for f in QUANT_FORMATS if not f.startswith("mixed")])
def test_streaming_heads_decode_takes_the_op(fmt, monkeypatch):
    seed = _seed()
    lens = [5, 90, 17, 41, 200]
    problem = make_problem(lens, [1] * len(lens), 6, 2, head_dim=32, block_size=8, seed=seed, fmt=fmt)
    g = torch.Generator().manual_seed(seed)
    key, value = torch.randn(len(lens), 2, 32, generator=g), torch.randn(len(lens), 2, 32, generator=g)

    def run():
        out = torch.full_like(problem.query, float("nan"))
        return window_attention(problem.query, problem.kv, problem.plan, problem.scale, out, 8, 16, key, value)

    with_op, without, calls = _both_ways(monkeypatch, run)
    assert calls == 1
    assert not torch.isnan(with_op).any()
    torch.testing.assert_close(with_op, without, rtol=0, atol=2e-5, msg=lambda m: f"seed={seed}: {m}")


def test_without_a_compiler_the_twin_serves_and_says_so_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_op, "_lib", None)
    monkeypatch.setattr(cpu_op, "_failed", None)
    monkeypatch.setenv("LCX_CC", "lcx-no-such-compiler")
    monkeypatch.setenv("LCX_CPU_OP_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="lcx"):
        assert cpu_op.library() is None and cpu_op.library() is None
    warnings = [r for r in caplog.records if "native CPU decode op is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "lcx-no-such-compiler" in warnings[0].getMessage()
    problem = make_problem([40, 9], [1, 1], 4, 2, head_dim=32, block_size=8, fmt="int8-g0")
    sel = random_selection(problem, "page", 0.5, 1)
    out = torch.full_like(problem.query, float("nan"))
    paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, sel, impl="torch")
    assert not torch.isnan(out).any()
    assert not list(tmp_path.glob("*.so")), "a failed build leaves no library behind"


def _awkward_rows(g, t, h, d):
    """Keys with every kind of group: gaussian, wide, tiny, constant, zero, one huge channel."""
    x = torch.randn(t, h, d, generator=g)
    x[0::5] *= 1e3
    x[1::5] *= 1e-6
    x[2::5] = 0.75
    x[3::5] = 0.0
    x[4::5, :, 0] = -4e4
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,d,group", [(8, 64, 64), (8, 40, 16), (4, 64, 64), (4, 32, 12), (4, 7, 3), (8, 5, 64)])
def test_native_write_stores_the_bytes_quant_encode_makes(bits, d, group, dtype):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    t, h, bs, nb = 40, 3, 8, 7
    key, value = _awkward_rows(g, t, h, d).to(dtype), torch.randn(t, h, d, generator=g).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[::7] = -1  # padding rows are skipped
    r = quant.row_bytes(d, bits, group)
    native = quant.quantized(torch.full((nb, h, bs, 2 * r), 7, dtype=torch.uint8), d, bits, group)
    cpu_op.encode_write(native, key[:, :, :], value, slots)
    expected = torch.full((nb, h, bs, 2 * r), 7, dtype=torch.uint8)
    rows = torch.cat([quant.encode(key, bits, group), quant.encode(value, bits, group)], -1)
    keep = slots >= 0
    expected[slots[keep] // bs, :, slots[keep] % bs] = rows[keep]
    diff = (native.raw != expected).nonzero()
    assert diff.numel() == 0, f"seed={seed}: {diff.shape[0]} bytes differ, first at {diff[0].tolist()}"


def test_write_takes_the_native_path_with_strided_inputs_and_rotated_keys(monkeypatch):
    """``QuantKVFormat.write`` goes native (one call) and stores what the torch path stores, for
    keys that are a strided view (as an engine's fused qkv output hands them over) and for int4
    pages that rotate keys."""
    g = torch.Generator().manual_seed(_seed())
    calls = []
    real = cpu_op.encode_write
    monkeypatch.setattr(cpu_op, "encode_write", lambda *a: calls.append(1) or real(*a))
    for bits, rotate in ((8, False), (4, True)):
        qkv = torch.randn(30, 5, 64, generator=g).to(torch.bfloat16)
        key, value = qkv[:, 1:3], qkv[:, 3:5]  # [30, 2, 64], token stride 5 * 64
        slots = torch.randperm(4 * 16, generator=g)[:30]
        r = quant.row_bytes(64, bits, 64)
        caches = [quant.quantized(torch.zeros(4, 2, 16, 2 * r, dtype=torch.uint8), 64, bits, 64, rotate) for _ in "ab"]
        calls.clear()
        caches[0].write(key, value, slots)
        monkeypatch.setenv("LCX_CPU_OP", "0")
        caches[1].write(key, value, slots)
        monkeypatch.delenv("LCX_CPU_OP")
        assert calls == [1]
        assert torch.equal(caches[0].raw, caches[1].raw), f"int{bits}: native and torch writes differ"


def test_a_slot_outside_the_cache_is_refused_before_anything_is_written():
    kv = quant.quantized(torch.zeros(2, 1, 4, 2 * quant.row_bytes(8, 8, 8), dtype=torch.uint8), 8, 8, 8)
    with pytest.raises(ValueError, match="slot outside the cache"):
        cpu_op.encode_write(kv, torch.ones(2, 1, 8), torch.ones(2, 1, 8), torch.tensor([3, 8]))
    assert not kv.raw.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_page_summaries_equal_the_torch_update(dtype, monkeypatch):
    """Prefill chunks over fresh and half-written pages, then decode tokens, some slots padding,
    keys a strided view: min, max and count equal, sums within float32 rounding."""
    from lcx_plugin.state import PageSummaries

    g = torch.Generator().manual_seed(_seed())
    nb, hkv, d, bs = 9, 2, 16, 8
    a, b = PageSummaries(nb, hkv, d, bs), PageSummaries(nb, hkv, d, bs)
    steps = [torch.arange(0, 13), torch.arange(13, 14), torch.tensor([14, -1, 15]), torch.arange(16, 40),
             torch.arange(0, 5)]  # the last rewrites page 0 from its first slot: a fresh summary
    for slots in steps:
        qkv = torch.randn(slots.shape[0], 3 * hkv, d, generator=g).to(dtype)
        key = qkv[:, hkv: 2 * hkv]
        a.update(key, slots)
        monkeypatch.setenv("LCX_CPU_OP", "0")
        b.update(key, slots)
        monkeypatch.delenv("LCX_CPU_OP")
    assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max) and torch.equal(a.count, b.count)
    torch.testing.assert_close(a.sum, b.sum, rtol=1e-6, atol=1e-5)


def test_page_list_spans_mark_what_the_twin_masks():
    table = torch.tensor([[5, 2, 7, 0], [1, 3, 4, 6]], dtype=torch.int32)
    indices = torch.tensor([[[0, 2, 3]], [[1, 3, 2]]], dtype=torch.int32)  # [B=2, Hkv=1, K=3]
    counts = torch.tensor([[3], [2]], dtype=torch.int32)
    spans = cpu_op.page_list_spans(indices, counts, torch.tensor([20, 30]), table, 8)
    # seq 0 (query at 19): page 0 whole, page 2 up to offset 3, page 3 past the query: padding;
    # seq 1 (query at 29): page 1 whole, page 3 up to offset 5, the third entry past its count.
    assert spans.tolist() == [[[[5, 0, 8], [7, 0, 4], [-1, 0, 0]]], [[[3, 0, 8], [6, 0, 6], [-1, 0, 0]]]]
