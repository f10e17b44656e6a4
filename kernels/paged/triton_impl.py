"""Triton paged attention: the GPU path.

One program handles ``BLOCK_M`` query tokens of one sequence for one query head and
streams that sequence's candidate keys in tiles of ``TILE_N``, with an online softmax in
float32. The candidate list is the whole context (dense), the tokens of selected pages, or
selected token positions; the causal mask is applied on top in every case. Key tiles are
independent of the page size: each candidate position is mapped to (block, offset) through
the block table, so a permuted block table is just another lookup.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import KVLayout
from .selection import Selection

SEL_DENSE, SEL_PAGE, SEL_TOKEN = 0, 1, 2
BLOCK_M = 16


def launch_config(head_dim: int) -> dict:
    """TILE_N, warps and pipeline stages per head size, chosen with the sm_90 compile gate so that
    no variant spills registers (see kernels/compile_gate.py)."""
    if head_dim <= 64:
        return {"TILE_N": 32, "num_warps": 4, "num_stages": 3}
    return {"TILE_N": 16, "num_warps": 8, "num_stages": 2}


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    kv_ptr,  # [num_blocks, Hkv, 2, block_size, D] (contiguous)
    out_ptr,  # [T, Hq, D]
    block_table_ptr,  # [B, max_pages] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B+1] int32
    sel_idx_ptr,  # [B, Hkv, max_sel] int32 (unused when SEL_KIND == 0)
    sel_cnt_ptr,  # [B, Hkv] int32 (unused when SEL_KIND == 0)
    scale,
    stride_qt: tl.int64,
    stride_qh: tl.int64,
    stride_ot: tl.int64,
    stride_oh: tl.int64,
    stride_bt: tl.int64,
    stride_sel_b: tl.int64,
    stride_sel_h: tl.int64,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    SEL_KIND: tl.constexpr,  # 0 dense, 1 page list, 2 token list
    FP32_DOT: tl.constexpr,  # exact fp32 products (interpreter, tests) vs tensor-core inputs
):
    tl.static_assert(BLOCK_M >= 16 and TILE_N >= 16 and BLOCK_D >= 16)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_tile = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_pos = first_pos + offs_m  # absolute position of each query row

    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)

    if SEL_KIND == 0:
        # Causal: no row of this tile sees past its last query position.
        last_pos = first_pos + tl.minimum((m_tile + 1) * BLOCK_M, q_len) - 1
        n_cand = last_pos + 1
    elif SEL_KIND == 1:
        n_cand = tl.load(sel_cnt_ptr + seq * NUM_KV_HEADS + kv_head) * BLOCK_SIZE
    else:
        n_cand = tl.load(sel_cnt_ptr + seq * NUM_KV_HEADS + kv_head)
    sel_row = sel_idx_ptr + seq * stride_sel_b + kv_head * stride_sel_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, TILE_N)
    for j0 in range(0, n_cand, TILE_N):
        j = j0 + offs_n
        in_range = j < n_cand
        if SEL_KIND == 0:
            pos = j
        elif SEL_KIND == 1:
            page = tl.load(sel_row + j // BLOCK_SIZE, mask=in_range, other=0)
            pos = page * BLOCK_SIZE + j % BLOCK_SIZE
        else:
            pos = tl.load(sel_row + j, mask=in_range, other=0)
        key_ok = in_range & (pos < seq_len)
        block = tl.load(block_table_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=key_ok, other=0)
        cell = (block.to(tl.int64) * NUM_KV_HEADS + kv_head) * 2 * BLOCK_SIZE * HEAD_DIM
        k_off = cell + (pos % BLOCK_SIZE) * HEAD_DIM
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(kv_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_ptr + (k_off + BLOCK_SIZE * HEAD_DIM)[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)

        if FP32_DOT:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        s = s * scale
        visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen nothing yet keep m = -inf; shift by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def paged_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    selection: Selection | None = None,
    *,
    max_query_len: int | None = None,
) -> torch.Tensor:
    lay = KVLayout.of(kv_cache)
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous for the Triton kernel")
    if query.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("query and out must have a unit stride on the head dimension")
    num_seqs = seq_lens.shape[0]
    hq = query.shape[1]
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if num_seqs else 0
    if num_seqs == 0 or max_query_len == 0:
        return out
    if selection is None:
        sel_kind, sel_idx, sel_cnt = SEL_DENSE, seq_lens, seq_lens
        stride_sel_b = stride_sel_h = 0
    else:
        sel_kind = SEL_PAGE if selection.granularity == "page" else SEL_TOKEN
        sel_idx, sel_cnt = selection.indices, selection.counts
        stride_sel_b, stride_sel_h = sel_idx.stride(0), sel_idx.stride(1)
    grid = (num_seqs, hq, triton.cdiv(max_query_len, BLOCK_M))
    _paged_attention_kernel[grid](
        q_ptr=query,
        kv_ptr=kv_cache,
        out_ptr=out,
        block_table_ptr=block_table,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        sel_idx_ptr=sel_idx,
        sel_cnt_ptr=sel_cnt,
        scale=scale,
        stride_qt=query.stride(0),
        stride_qh=query.stride(1),
        stride_ot=out.stride(0),
        stride_oh=out.stride(1),
        stride_bt=block_table.stride(0),
        stride_sel_b=stride_sel_b,
        stride_sel_h=stride_sel_h,
        NUM_KV_HEADS=lay.num_kv_heads,
        GROUP=hq // lay.num_kv_heads,
        HEAD_DIM=lay.head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(lay.head_dim)),
        BLOCK_SIZE=lay.block_size,
        BLOCK_M=BLOCK_M,
        SEL_KIND=sel_kind,
        FP32_DOT=_interpreting() or query.dtype == torch.float32,
        **launch_config(lay.head_dim),
    )
    return out
