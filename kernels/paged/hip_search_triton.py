"""Triton kernel of HiP's hierarchical page search (see ``hip_search.py`` for what it computes).

One program per (query block, KV head). It holds the round's ``2k`` chunks as two index vectors,
scores their middle pages ``CHUNK_TILE`` at a time against every row of its block (two ``tl.dot``
per tile of rows: ``Q·C^T + |Q|·R^T``, float32), ranks the chunks by comparisons against
``CHUNK_TILE`` others at a time (ties: the lower position; the order the torch twin's stable sort
gives), and writes the kept chunks' halves to a small scratch row at ``2 * rank`` and
``2 * rank + 1``, which the next round reads back. After the last round the kept pages are
written ascending, placed by the same kind of count. Tiling both axes keeps registers
independent of ``k``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def launch_config(head_dim: int) -> dict:
    """Rows and chunks per tile, and warps, per head size; checked for registers and spills by the
    sm_90 gate (the chunk vectors' length, 2k, only changes loop trip counts)."""
    return {"BLOCK_R": 16, "CHUNK_TILE": 16, "num_warps": 8}


@triton.jit
def _hip_search_kernel(
    q_ptr,  # [NQB, Hkv, R, D] float32/bf16, unit stride on D
    c_ptr,  # [P, Hkv, D] float32 page key centres, unit stride on D
    r_ptr,  # [P, Hkv, D] float32 page key radii, same strides as c
    hi_ptr,  # [NQB] int32: block i chooses among pages [lo, hi[i])
    scratch_ptr,  # [NQB, Hkv, 3, BLOCK_M] int32: next round's chunk starts, ends; this round's representatives
    score_ptr,  # [NQB, Hkv, BLOCK_M] float32: this round's chunk scores
    pages_ptr,  # [NQB, Hkv, K] int32 out
    counts_ptr,  # [NQB, Hkv] int32 out
    lo, n_rows, n_rounds,
    stride_qb: tl.int64, stride_qh: tl.int64, stride_qr: tl.int64,
    stride_cp: tl.int64, stride_ch: tl.int64,
    K: tl.constexpr,  # pages to keep
    BLOCK_M: tl.constexpr,  # 2K rounded up to a power of two (>= 16)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two (>= 16)
    BLOCK_R: tl.constexpr,  # rows per tile (>= 16)
    CHUNK_TILE: tl.constexpr,  # chunks scored (and ranked) per inner step (>= 16, divides BLOCK_M)
):
    blk = tl.program_id(0)
    head = tl.program_id(1)
    n_heads = tl.num_programs(1)
    M = 2 * K
    offs_m = tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, CHUNK_TILE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    d_ok = offs_d < HEAD_DIM
    in_round = offs_m < M
    hi = tl.load(hi_ptr + blk)
    span = tl.maximum(hi - lo, 0)
    c_lo = lo + (offs_m * span) // M
    c_hi = lo + ((offs_m + 1) * span) // M
    c_hi = tl.where(in_round, c_hi, c_lo)
    prog = blk * n_heads + head
    scratch = scratch_ptr + prog * 3 * BLOCK_M
    scores = score_ptr + prog * BLOCK_M
    q_base = q_ptr + blk * stride_qb + head * stride_qh
    ok = in_round
    for rnd in range(n_rounds):
        size = c_hi - c_lo
        live = in_round & (size > 0)
        tl.store(scratch + 2 * BLOCK_M + offs_m, tl.where(live, c_lo + tl.maximum(size - 1, 0) // 2, -1))
        tl.debug_barrier()
        # Score CHUNK_TILE chunks at a time against every row: their middle pages' bounds.
        for m0 in range(0, BLOCK_M, CHUNK_TILE):
            rep = tl.load(scratch + 2 * BLOCK_M + m0 + offs_t)
            cd_off = rep[:, None] * stride_cp + head * stride_ch + offs_d[None, :]
            cd_mask = (rep >= 0)[:, None] & d_ok[None, :]
            cen = tl.load(c_ptr + cd_off, mask=cd_mask, other=0.0).to(tl.float32)  # [CHUNK_TILE, BLOCK_D]
            rad = tl.load(r_ptr + cd_off, mask=cd_mask, other=0.0).to(tl.float32)
            best = tl.full([CHUNK_TILE], float("-inf"), tl.float32)
            for r0 in range(0, n_rows, BLOCK_R):
                rows = r0 + offs_r
                q = tl.load(q_base + rows[:, None] * stride_qr + offs_d[None, :],
                            mask=(rows < n_rows)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(cen), input_precision="ieee") + \
                    tl.dot(tl.abs(q), tl.trans(rad), input_precision="ieee")
                s = tl.where((rows < n_rows)[:, None], s, float("-inf"))
                best = tl.maximum(best, tl.max(s, axis=0))
            tl.store(scores + m0 + offs_t, tl.where(rep >= 0, best, float("-inf")))
        tl.debug_barrier()
        score = tl.load(scores + offs_m)
        # rank[j]: real chunks ahead of j (a higher score, or an equal one at a lower position),
        # counted CHUNK_TILE candidates at a time.
        rank = tl.zeros([BLOCK_M], tl.int32)
        for i0 in range(0, BLOCK_M, CHUNK_TILE):
            s_i = tl.load(scores + i0 + offs_t)
            pos_i = i0 + offs_t
            ahead = (pos_i < M)[None, :] & ((s_i[None, :] > score[:, None]) |
                                            ((s_i[None, :] == score[:, None]) & (pos_i[None, :] < offs_m[:, None])))
            rank += tl.sum(ahead.to(tl.int32), axis=1)
        keep = in_round & (rank < K)
        ok = keep & live
        if rnd < n_rounds - 1:
            mid = c_lo + (size + 1) // 2
            tl.store(scratch + 2 * rank, c_lo, mask=keep)
            tl.store(scratch + 2 * rank + 1, tl.where(ok, mid, c_lo), mask=keep)
            tl.store(scratch + BLOCK_M + 2 * rank, tl.where(ok, mid, c_lo), mask=keep)
            tl.store(scratch + BLOCK_M + 2 * rank + 1, tl.where(ok, c_hi, c_lo), mask=keep)
            tl.debug_barrier()
            c_lo = tl.load(scratch + offs_m, mask=in_round, other=0)
            c_hi = tl.load(scratch + BLOCK_M + offs_m, mask=in_round, other=0)
            tl.debug_barrier()
    # Kept pages, ascending: each one's place is the number of kept pages below it.
    page = tl.where(ok, c_lo, 2147483647)
    tl.store(scratch + 2 * BLOCK_M + offs_m, page)
    tl.debug_barrier()
    place = tl.zeros([BLOCK_M], tl.int32)
    for i0 in range(0, BLOCK_M, CHUNK_TILE):
        p_i = tl.load(scratch + 2 * BLOCK_M + i0 + offs_t)
        place += tl.sum((p_i[None, :] < page[:, None]).to(tl.int32), axis=1)
    out = pages_ptr + prog * K
    tl.store(out + place, page, mask=ok)
    tl.store(counts_ptr + prog, tl.sum(ok.to(tl.int32), axis=0))


def rounds_for(max_span: int, k: int) -> int:
    """Rounds until every chunk is one page: the first round's chunks hold at most
    ``ceil(span / 2k)`` pages and every round halves them (rounding up)."""
    size, rounds = -(-max(max_span, 1) // (2 * k)), 1
    while size > 1:
        size, rounds = -(-size // 2), rounds + 1
    return rounds


def search_pages_triton(rows: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, lo: int, hi: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``hip_search.search_pages`` on the GPU (or in the interpreter); the same arguments and results."""
    nqb, hkv, n_rows, d = rows.shape
    dev = rows.device
    if nqb == 0 or int((hi.long() - lo).clamp(min=0).max()) == 0:  # nothing eligible anywhere
        return (torch.zeros(nqb, hkv, k, dtype=torch.int32, device=dev),
                torch.zeros(nqb, hkv, dtype=torch.int32, device=dev))
    span = int((hi.long() - lo).clamp(min=0).max())
    # Poisoned: the kernel writes every count and every live page.
    pages = torch.full((nqb, hkv, k), -1, dtype=torch.int32, device=dev)
    counts = torch.full((nqb, hkv), -1, dtype=torch.int32, device=dev)
    rows = rows.contiguous()
    centre, radius = centre.float().contiguous(), radius.float().contiguous()
    block_m = max(16, 1 << math.ceil(math.log2(2 * k)))
    scratch = torch.empty(nqb, hkv, 3, block_m, dtype=torch.int32, device=dev)
    scores = torch.empty(nqb, hkv, block_m, dtype=torch.float32, device=dev)
    launch = launch_config(d)
    _hip_search_kernel[(nqb, hkv)](
        rows, centre, radius, hi.to(device=dev, dtype=torch.int32).contiguous(), scratch, scores, pages, counts,
        lo, n_rows, rounds_for(span, k),
        rows.stride(0), rows.stride(1), rows.stride(2), centre.stride(0), centre.stride(1),
        K=k, BLOCK_M=block_m, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), **launch)
    return pages, counts
