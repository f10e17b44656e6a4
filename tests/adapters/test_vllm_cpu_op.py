"""lcx against vLLM's own CPU attention op: the cache packing lcx reads in place, and the op driven by
rewritten block tables for page lists, both checked against the float64 reference.

These fail loudly if a vLLM release changes its CPU cache packing or the op's contract.
"""
from types import SimpleNamespace

import pytest
import torch

from lcx_plugin.attention_backends.vllm import compat, cpu_native
from lcx_plugin.kernels.paged import BatchPlan, Selection, formats
from lcx_plugin.kernels.paged.reference import paged_attention_reference

LAYER = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _engine_written(isa, dtype, nb=6, hkv=3, bs=32, d=64, seed=0):
    """A cache filled by the op's own writer, and the keys/values it was given."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.full((nb, hkv, bs, 2 * d), float("nan"), dtype=dtype)
    k = torch.randn(nb * bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(nb * bs, hkv, d, generator=g).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)
    cpu_native.write_kv(LAYER, k, v, cache, slots, isa, "auto")
    return cache, k, v, slots


@pytest.mark.parametrize("isa, dtype", [("vec", torch.bfloat16), ("vec", torch.float32), ("vec16", torch.bfloat16),
                                        ("vec16", torch.float32), ("amx", torch.bfloat16)])
def test_lcx_reads_and_writes_the_ops_packing(isa, dtype):
    seed = _seed()
    try:
        cache, k, v, slots = _engine_written(isa, dtype, seed=seed)
    except RuntimeError as e:  # the op is built per ISA: no AMX kernels on a CPU without AMX
        if "Unsupported CPU attention configuration" not in str(e):
            raise
        _own_round_trip(isa, dtype, seed)
        pytest.skip(f"this machine's vLLM CPU op has no {isa} kernels ({e}); lcx's own {isa} writer and "
                    "reader were checked against each other only")
    kv = formats.vllm_cpu(cache, isa)
    bs = kv.block_size
    for i in range(0, slots.shape[0], 7):
        kk, vv = kv.token(int(slots[i]) // bs, 1, int(slots[i]) % bs)
        assert torch.equal(kk, k[i, 1]) and torch.equal(vv, v[i, 1]), f"seed={seed} slot {int(slots[i])}"
    # Gathering whole cells gives the same tokens.
    blocks = torch.tensor([[3, 0], [5, 2]])
    heads = torch.tensor([[0, 0], [2, 1]])
    gk, gv = kv.gather(blocks, heads)
    for i in range(2):
        for j in range(2):
            for off in (0, bs - 1):
                assert torch.equal(gk[i, j, off], kv.token(int(blocks[i, j]), int(heads[i, j]), off)[0])
                assert torch.equal(gv[i, j, off], kv.token(int(blocks[i, j]), int(heads[i, j]), off)[1])
    # lcx's own writer, following the format, produces the op's bytes exactly.
    mine = torch.full_like(cache, float("nan"))
    formats.vllm_cpu(mine, isa).write(k, v, slots)
    assert torch.equal(mine, cache)


def _own_round_trip(isa, dtype, seed, nb=6, hkv=3, bs=32, d=64):
    """Where the op cannot write a packing: lcx's writer for it, read back token by token and by gather."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(nb * bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(nb * bs, hkv, d, generator=g).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)
    kv = formats.vllm_cpu(torch.full((nb, hkv, bs, 2 * d), float("nan"), dtype=dtype), isa)
    kv.write(k, v, slots)
    for i in range(slots.shape[0]):
        kk, vv = kv.token(int(slots[i]) // bs, i % hkv, int(slots[i]) % bs)
        assert torch.equal(kk, k[i, i % hkv]) and torch.equal(vv, v[i, i % hkv]), f"seed={seed} slot {int(slots[i])}"
    gk, _ = kv.gather(torch.tensor([[int(slots[0]) // bs]]), torch.tensor([[0]]))
    assert torch.equal(gk[0, 0, int(slots[0]) % bs], k[0, 0]), f"seed={seed}"


def _decode_problem(dtype, seed, lens=(700, 300, 129), hq=9, hkv=3, bs=128, d=64):
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // bs) for n in lens]
    nb = sum(pages) + 2
    perm = torch.randperm(nb, generator=g)
    table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    # Stale, finite garbage where nothing was written (vLLM zero-fills its cache, and slots hold old
    # tokens' keys afterwards): large enough that attending to any of it would show.
    cache = (100 * torch.randn(nb, hkv, bs, 2 * d, generator=g)).to(dtype)
    isa = compat.cpu_attn_isa(dtype, bs, d, "auto")
    used = 0
    for b, (n, p) in enumerate(zip(lens, pages)):
        table[b, :p] = perm[used: used + p].to(torch.int32)
        used += p
        slots = table[b, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
        cpu_native.write_kv(LAYER, torch.randn(n, hkv, d, generator=g).to(dtype),
                            torch.randn(n, hkv, d, generator=g).to(dtype), cache, slots, isa, "auto")
    plan = BatchPlan.from_lists([1] * len(lens), list(lens), table)
    return cache, plan, torch.randn(len(lens), hq, d, generator=g).to(dtype), isa, pages


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_head_lists", "one_list"])
def test_op_runs_page_lists_from_rewritten_block_tables(dtype, tol, shared):
    seed = _seed()
    cache, plan, q, isa, pages = _decode_problem(dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    hkv, width = 3, max(pages)
    idx = torch.zeros(3, hkv, width, dtype=torch.int32)
    cnt = torch.zeros(3, hkv, dtype=torch.int32)
    for b, p in enumerate(pages):
        for h in range(hkv):
            if shared and h:
                idx[b, h], cnt[b, h] = idx[b, 0], cnt[b, 0]
                continue
            chosen = sorted(set(torch.randperm(p, generator=g)[: max(1, p // 2)].tolist()) | ({p - 1} if h != 1 else set()))
            idx[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            cnt[b, h] = len(chosen)
    sel = Selection.build(3, hkv, indices=idx, counts=cnt)
    assert sel.only_page_lists
    out = torch.full_like(q, float("nan"))
    sched = cpu_native.scheduler_metadata(plan, num_heads=9, num_kv_heads=3, head_dim=64, dtype=dtype, isa=isa,
                                          kv_cache_dtype="auto")
    del sched  # the page path builds its own per-list work plans
    cpu_native.attention_page_lists(LAYER, q, cache, out, plan, sel, scale=0.125, dtype=dtype, isa=isa,
                                    kv_cache_dtype="auto")
    expected = paged_attention_reference(q, cpu_native.kv_format(cache, isa), plan, 0.125, sel)
    assert not torch.isnan(out).any(), f"seed={seed}"
    assert (out.double() - expected).abs().max() < tol, f"seed={seed}"


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_dense_op_matches_the_reference(dtype, tol):
    seed = _seed()
    cache, plan, q, isa, _ = _decode_problem(dtype, seed)
    plan = BatchPlan(plan.query_start_loc, plan.seq_lens, plan.block_table, engine=cpu_native.scheduler_metadata(
        plan, num_heads=9, num_kv_heads=3, head_dim=64, dtype=dtype, isa=isa, kv_cache_dtype="auto"))
    out = torch.full_like(q, float("nan"))
    cpu_native.attention(LAYER, q, cache, out, plan, scale=0.125, kv_cache_dtype="auto")
    expected = paged_attention_reference(q, cpu_native.kv_format(cache, isa), plan, 0.125)
    assert (out.double() - expected).abs().max() < tol, f"seed={seed}"
