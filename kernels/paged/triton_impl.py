"""Triton paged attention: the GPU path.

One program handles ``BLOCK_M`` query rows of one sequence for one query head and streams that
sequence's candidate keys in tiles of ``TILE_N``, with an online softmax in float32. The
candidates are read in up to three passes, each with the row's exact visibility mask:

1. dense (no selection, or a dense-marked head): every position up to the tile's last row;
2. window mode: the sinks, then the band of recent positions the tile's rows can see;
3. the selected list of the tile's query block (pages or tokens), minus what pass 2 covered.

Keys and values are read through four strides each (block, head, token, dim), so any 4-D
storage format works: lcx's plain pages, vLLM's CUDA ``[blocks, block_size, Hkv, D]`` and
SGLang's token pool. Key tiles are independent of the page size: each candidate position is
mapped to (block, offset) through the block table.

Quantized pages (``quant.QuantKVFormat``) go through the same kernel, specialised by the
constexpr ``QUANT_BITS`` (0: plain elements). Keys and values are then byte planes of the cache
(strides in bytes), and each tile is dequantized on load (``dequant_rows``): the uint8 codes of
each token row (int4: two per byte, the even channel in the low nibble, split with
``tl.interleave``), and each group's bfloat16 scale and zero point, read through a bfloat16
pointer at the row's even metadata offset, upcast to float32: ``x = zero + code * scale``. The
cache is never expanded. Mixed pages (``mixed.MixedKVFormat``, constexpr ``HIGH_SLOTS`` > 0) read
their int4 rows so, then each token's offset against its page's slot headers (``high_slot_rows``):
a token holding a slot is read from that slot's int8 rows instead.

**Compacted positions** (constexpr ``COMPACT``, from ``rope``; see ``torch_impl`` for the
definition): keys before a row's window move by ``g_ij = u(p_i - window) - u(p_j)``, ``u(x)`` the
positions ``<= x`` that are neither sinks nor listed. The program first counts, per row, the held
positions up to its window's edge (one pass over the list's indices, no keys), which gives each
row's shift; a listed entry's own shift follows from its index in the sorted list. Scores of
moving pairs are ``(R(-row_shift) q) . (R(-key_shift) k)``: the query tile is turned once per
program, each sink or listed key tile once as it is loaded (angles in float64, the pairing by
``tl.flip`` over the rotated dimensions). Window tiles never move. Pairs that do not move keep the
plain product, as in the twin.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import quant
from .formats import KVFormat
from .api import triton_cannot_compact
from .plan import BatchPlan
from .rope import Rope
from .selection import QUERY_TILE, Selection

SEL_DENSE, SEL_PAGE, SEL_TOKEN = 0, 1, 2
BLOCK_M = QUERY_TILE


def launch_config(head_dim: int, fp32_dot: bool, quant_bits: int = 0, compact: bool = False,
                  mixed: bool = False) -> dict:
    """TILE_N, warps and pipeline stages per head size, dot precision, page kind (``quant_bits``
    8 or 4: quantized pages, dequantized tile by tile in registers; 0: plain; ``mixed``: int4
    rows and int8 slots) and compacted positions (turned tiles), chosen with the sm_90 compile
    gate so that no variant spills registers (see kernels/compile_gate.py)."""
    if mixed:
        if head_dim <= 64:
            return {"TILE_N": 16, "num_warps": 8, "num_stages": 3}
        return {"TILE_N": 16, "num_warps": 16 if fp32_dot else 8, "num_stages": 2}
    if head_dim <= 64:
        return {"TILE_N": 16, "num_warps": 8 if (quant_bits and fp32_dot) or compact else 4, "num_stages": 3}
    return {"TILE_N": 16 if fp32_dot or quant_bits == 8 else 32, "num_warps": 8, "num_stages": 2}


@triton.jit
def dequant_rows(ptr, row_off, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT_BITS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, META_AT: tl.constexpr):
    """Dequantized token rows of one side (keys or values) of quantized pages: ``[N, BLOCK_D]``
    float32, ``zero + code * scale``; 0 for rows not ``row_ok`` and channels past ``HEAD_DIM``.

    ``ptr + row_off`` (``row_off`` ``[N]``, in bytes) is each row's first byte:
    ``[codes | pad to even | per group: bf16 scale, bf16 zero]``, ``META_AT`` the (even) offset of
    the first group's scale. ``GROUP_SIZE`` is at most ``HEAD_DIM`` (one group when equal)."""
    N: tl.constexpr = row_off.shape[0]
    rows = ptr + row_off[:, None]  # [N, 1]: each row's first byte
    if QUANT_BITS == 8:
        offs_c = tl.arange(0, BLOCK_D)
        codes = tl.load(rows + offs_c[None, :], mask=row_ok[:, None] & (offs_c < HEAD_DIM)[None, :], other=0)
    else:
        # Two codes per byte, the even channel in the low nibble: split and interleave.
        offs_b = tl.arange(0, BLOCK_D // 2)
        packed = tl.load(rows + offs_b[None, :], mask=row_ok[:, None] & (offs_b < (HEAD_DIM + 1) // 2)[None, :],
                         other=0)
        codes = tl.interleave(packed & 15, packed >> 4)
    codes = codes.to(tl.float32)
    if BLOCK_D % GROUP_SIZE == 0:
        # Groups tile BLOCK_D evenly (GROUP_SIZE a power of two): one scale/zero load per group
        # and row, broadcast over its channels.
        NG: tl.constexpr = BLOCK_D // GROUP_SIZE
        offs_g = tl.arange(0, NG)
        g_mask = row_ok[:, None] & (offs_g * GROUP_SIZE < HEAD_DIM)[None, :]
        meta = (rows + META_AT + 4 * offs_g[None, :]).to(tl.pointer_type(tl.bfloat16))  # even byte offsets
        g_scale = tl.load(meta, mask=g_mask, other=0.0).to(tl.float32)
        g_zero = tl.load(meta + 1, mask=g_mask, other=0.0).to(tl.float32)
        x = tl.reshape(codes, (N, NG, GROUP_SIZE)) * g_scale[:, :, None] + g_zero[:, :, None]
        x = tl.reshape(x, (N, BLOCK_D))
    else:
        # Any other group size: each channel reads its group's scale and zero (cached loads).
        offs_d = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        meta = (rows + META_AT + 4 * (offs_d // GROUP_SIZE)[None, :]).to(tl.pointer_type(tl.bfloat16))
        x = codes * tl.load(meta, mask=mask, other=0.0).to(tl.float32) + tl.load(meta + 1, mask=mask, other=0.0).to(tl.float32)
    if HEAD_DIM < BLOCK_D:
        x = tl.where((tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :], x, 0.0)
    return x


@triton.jit
def high_slot_rows(ptr, pool, off, key_ok, HIGH_SLOTS: tl.constexpr, SLOT_BYTES: tl.constexpr):
    """Mixed pages: for each token (its cell's slot pool at byte ``pool``, its in-page offset
    ``off``), whether it holds an int8 slot and the byte offset of that slot's key row (its value
    row follows ``HIGH_ROW`` bytes later). Each slot opens with the held offset as int16 (-1: free)."""
    sel = tl.full(off.shape, -1, tl.int32)
    for s in range(HIGH_SLOTS):  # a loop, not unrolled: the held offsets are a few cached loads
        held = tl.load((ptr + pool + s * SLOT_BYTES).to(tl.pointer_type(tl.int16)), mask=key_ok, other=-1)
        sel = tl.where(held.to(tl.int32) == off, s, sel)
    has = key_ok & (sel >= 0)
    return has, pool + tl.maximum(sel, 0).to(tl.int64) * SLOT_BYTES + 4


@triton.jit
def rotate_rows(x, delta, inv_freq_ptr, BLOCK_D: tl.constexpr, ROT_DIM: tl.constexpr, NEOX: tl.constexpr):
    """``x`` ``[N, BLOCK_D]`` float32, each row turned by RoPE over ``delta`` (``[N]``) positions:
    ``Rope.rotate``. The first ``ROT_DIM`` channels rotate (a power of two dividing ``BLOCK_D``);
    neox pairs channel ``i`` with ``i + ROT_DIM / 2``, GPT-J ``2i`` with ``2i + 1``."""
    N: tl.constexpr = x.shape[0]
    HALF: tl.constexpr = ROT_DIM // 2
    offs_d = tl.arange(0, BLOCK_D)
    if NEOX:
        freq = offs_d % HALF
        first = (offs_d % ROT_DIM) < HALF
        partner = tl.reshape(tl.flip(tl.reshape(x, (N, BLOCK_D // ROT_DIM, 2, HALF)), 2), (N, BLOCK_D))
    else:
        freq = offs_d // 2
        first = offs_d % 2 == 0
        partner = tl.reshape(tl.flip(tl.reshape(x, (N, BLOCK_D // 2, 2)), 2), (N, BLOCK_D))
    rotated = offs_d < ROT_DIM
    inv = tl.load(inv_freq_ptr + freq, mask=rotated, other=0.0)  # float64
    # The angle in float64 (a shift of 1e5 positions is 1e5 radians: float32 would be off by 1e-2),
    # brought into [-pi, pi] there; cosine and sine of that in float32.
    angle = delta.to(tl.float64)[:, None] * inv[None, :]
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)  # whole turns, 1 / (2 pi)
    angle = (angle - turns * 6.283185307179586).to(tl.float32)
    cos = tl.where(rotated[None, :], tl.cos(angle), 1.0)
    sin = tl.where(rotated[None, :], tl.sin(angle), 0.0)
    sign = tl.where(first, -1.0, 1.0)
    return x * cos + partner * (sin * sign[None, :])


@triton.jit
def _accumulate(q, pos, key_ok, visible, m_i, l_i, acc, seq, kv_head, scale,
                k_ptr, v_ptr, block_table_ptr, stride_bt,
                stride_kb, stride_kh, stride_kt, k_dim_off, stride_vb, stride_vh, stride_vt, v_dim_off,
                d_ok, BLOCK_SIZE: tl.constexpr, FP32_DOT: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT_BITS: tl.constexpr,
                GROUP_SIZE: tl.constexpr, META_AT: tl.constexpr,
                HIGH_SLOTS: tl.constexpr, SLOT_BYTES: tl.constexpr, HIGH_META_AT: tl.constexpr, HIGH_ROW: tl.constexpr,
                q_far=None, key_shift=None, far=None, inv_freq_ptr=None,
                MOVES: tl.constexpr = False, ROT_DIM: tl.constexpr = 0, NEOX: tl.constexpr = True):
    """One key tile: load K/V at ``pos`` (``[TILE_N]``), mask by ``visible`` (``[BLOCK_M, TILE_N]``),
    and fold it into the running softmax state. With ``MOVES`` (compacted positions), the pairs in
    ``far`` score the turned query tile ``q_far`` against the keys turned back by ``key_shift``."""
    block = tl.load(block_table_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    off = pos % BLOCK_SIZE
    k_off = block * stride_kb + kv_head * stride_kh + off * stride_kt
    v_off = block * stride_vb + kv_head * stride_vh + off * stride_vt
    if QUANT_BITS == 0:
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_off[:, None] + k_dim_off[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + v_dim_off[None, :], mask=kv_mask, other=0.0)
    else:
        k = dequant_rows(k_ptr, k_off, key_ok, HEAD_DIM, BLOCK_D, QUANT_BITS, GROUP_SIZE, META_AT)
        v = dequant_rows(v_ptr, v_off, key_ok, HEAD_DIM, BLOCK_D, QUANT_BITS, GROUP_SIZE, META_AT)
        if HIGH_SLOTS > 0:  # mixed pages: tokens holding an int8 slot are read from it
            pool = block * stride_kb + kv_head * stride_kh + BLOCK_SIZE * stride_kt  # the cell's slot pool
            has, row = high_slot_rows(k_ptr, pool, off, key_ok, HIGH_SLOTS, SLOT_BYTES)
            k = tl.where(has[:, None], dequant_rows(k_ptr, row, has, HEAD_DIM, BLOCK_D, 8, GROUP_SIZE, HIGH_META_AT), k)
            v = tl.where(has[:, None], dequant_rows(k_ptr, row + HIGH_ROW, has, HEAD_DIM, BLOCK_D, 8, GROUP_SIZE,
                                                    HIGH_META_AT), v)
        if not FP32_DOT:
            k = k.to(q.dtype)  # tensor-core inputs in the query's dtype
            v = v.to(q.dtype)
    if FP32_DOT:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))  # q arrives in the cache's dtype
    if MOVES:
        k_far = rotate_rows(k.to(tl.float32), -key_shift, inv_freq_ptr, BLOCK_D, ROT_DIM, NEOX)
        if FP32_DOT:
            s_far = tl.dot(q_far, tl.trans(k_far), input_precision="ieee")
        else:
            s_far = tl.dot(q_far, tl.trans(k_far.to(q_far.dtype)))
        s = tl.where(far, s_far, s)
    s = tl.where(visible, s * scale, float("-inf"))
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
    return m_new, l_i, acc


@triton.jit
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # keys, 4-D strided: [num_blocks, Hkv, block_size, D]
    v_ptr,  # values, 4-D strided: [num_blocks, Hkv, block_size, D]
    out_ptr,  # [T, Hq, D]
    block_table_ptr,  # [B, max_pages] int32
    seq_lens_ptr,  # [B] int32
    query_start_loc_ptr,  # [B+1] int32
    sel_idx_ptr,  # [B, Hkv, NQB, max_sel] int32
    sel_cnt_ptr,  # [B, Hkv, NQB] int32
    sink_ptr,  # [B, Hkv] int32
    window_ptr,  # [B, Hkv] int32
    dense_ptr,  # [B, Hkv] int8
    scale,
    stride_qt: tl.int64, stride_qh: tl.int64,
    stride_ot: tl.int64, stride_oh: tl.int64,
    stride_kb: tl.int64, stride_kh: tl.int64, stride_kt: tl.int64, stride_kd: tl.int64,
    stride_vb: tl.int64, stride_vh: tl.int64, stride_vt: tl.int64, stride_vd: tl.int64,
    stride_bt: tl.int64,
    stride_sel_b: tl.int64, stride_sel_h: tl.int64, stride_sel_q: tl.int64,
    num_query_blocks,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    SEL_KIND: tl.constexpr,  # 0 dense, 1 page lists, 2 token lists
    QUERY_BLOCK: tl.constexpr,  # rows per query block of the lists (0: one list); a multiple of BLOCK_M
    FP32_DOT: tl.constexpr,  # exact fp32 products (interpreter, tests) vs tensor-core inputs
    QUANT_BITS: tl.constexpr = 0,  # 0: plain elements; 8 or 4: quantized pages, k_ptr/v_ptr uint8 byte planes
    GROUP_SIZE: tl.constexpr = 1,  # quantized: channels per scale/zero group (<= HEAD_DIM)
    META_AT: tl.constexpr = 0,  # quantized: byte offset of the first group's scale in a token row
    HIGH_SLOTS: tl.constexpr = 0,  # mixed pages: int8 slots per page (0: none), in each cell after its rows
    SLOT_BYTES: tl.constexpr = 0,  # mixed: bytes per slot (int16 offset, fp16 importance, int8 key and value rows)
    HIGH_META_AT: tl.constexpr = 0,  # mixed: byte offset of the first scale in an int8 row
    HIGH_ROW: tl.constexpr = 0,  # mixed: bytes of an int8 row (the value row follows the key row)
    inv_freq_ptr=None,  # compacted positions: RoPE's inverse frequencies [ROT_DIM // 2] float64
    COMPACT: tl.constexpr = False,  # compacted positions (with a selection; see the module docstring)
    ROT_DIM: tl.constexpr = 0,  # compacted: rotated channels (a power of two dividing BLOCK_D)
    NEOX: tl.constexpr = True,  # compacted: neox pairing (else GPT-J)
):
    tl.static_assert(BLOCK_M >= 16 and TILE_N >= 16 and BLOCK_D >= 16)
    tl.static_assert(QUERY_BLOCK % BLOCK_M == 0)
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
    lo_pos = first_pos + m_tile * BLOCK_M  # the tile's first and last row positions
    hi_pos = first_pos + tl.minimum((m_tile + 1) * BLOCK_M, q_len) - 1

    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    elif QUANT_BITS == 0:
        q = q.to(k_ptr.dtype.element_ty)  # tensor-core inputs, converted once
    # (quantized pages: the query keeps its own 16-bit dtype; tiles are dequantized to it)

    # Offsets along the head dimension fit in 32 bits (D times a page at most): keep them narrow.
    k_dim_off = (offs_d * stride_kd).to(tl.int32)
    v_dim_off = (offs_d * stride_vd).to(tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, TILE_N)

    dense = SEL_KIND == 0
    sink = 0
    window = 0
    if SEL_KIND != 0:
        hv = seq * NUM_KV_HEADS + kv_head
        dense = tl.load(dense_ptr + hv) != 0
        sink = tl.load(sink_ptr + hv)
        window = tl.load(window_ptr + hv)

    if dense:
        # Pass 1: causal over every position up to the tile's last row.
        for j0 in range(0, hi_pos + 1, TILE_N):
            pos = j0 + offs_n
            key_ok = pos <= hi_pos
            visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            m_i, l_i, acc = _accumulate(q, pos, key_ok, visible, m_i, l_i, acc, seq, kv_head, scale,
                                        k_ptr, v_ptr, block_table_ptr, stride_bt,
                                        stride_kb, stride_kh, stride_kt, k_dim_off,
                                        stride_vb, stride_vh, stride_vt, v_dim_off,
                                        d_ok, BLOCK_SIZE, FP32_DOT,
                                        HEAD_DIM, BLOCK_D, QUANT_BITS, GROUP_SIZE, META_AT,
                                        HIGH_SLOTS, SLOT_BYTES, HIGH_META_AT, HIGH_ROW)
    else:
        # This tile's query block's list (pages or tokens): ``n_entries`` sorted entries.
        qb = 0
        if QUERY_BLOCK > 0:
            qb = tl.minimum((m_tile * BLOCK_M) // QUERY_BLOCK, num_query_blocks - 1)
        sel_row = sel_idx_ptr + seq * stride_sel_b + kv_head * stride_sel_h + qb * stride_sel_q
        n_entries = tl.load(sel_cnt_ptr + (seq * NUM_KV_HEADS + kv_head) * num_query_blocks + qb)
        UNIT: tl.constexpr = BLOCK_SIZE if SEL_KIND == 1 else 1  # tokens per entry
        edge = q_pos - window  # each row's last position before its window
        row_shift = edge
        below_sink = 0  # listed tokens below the sinks (they come first in the sorted list)
        q_far = q
        if COMPACT:
            # Held positions (sinks and listed tokens) up to each row's edge, from the indices alone.
            held = tl.maximum(tl.minimum(sink, edge + 1), 0)
            at_query = q_pos < sink
            for e0 in range(0, n_entries, TILE_N):
                e = e0 + offs_n
                e_ok = e < n_entries
                start = tl.load(sel_row + e, mask=e_ok, other=0) * UNIT
                lo = tl.maximum(start, sink)
                hi = tl.minimum(edge[:, None], start[None, :] + UNIT - 1)
                held += tl.sum(tl.where(e_ok[None, :], tl.maximum(hi - lo[None, :] + 1, 0), 0), 1)
                covers = e_ok[None, :] & (start[None, :] <= q_pos[:, None]) & (q_pos[:, None] < start[None, :] + UNIT)
                at_query = at_query | (tl.sum(covers.to(tl.int32), 1) > 0)
                below_sink += tl.sum(tl.where(e_ok, tl.minimum(tl.maximum(sink - start, 0), UNIT), 0))
            # u(p_i - window); without a window, a query that is not held sits right after its last candidate.
            row_shift = edge + 1 - held - ((window == 0) & ~at_query).to(tl.int32)
            q_far = rotate_rows(q.to(tl.float32), -row_shift, inv_freq_ptr, BLOCK_D, ROT_DIM, NEOX)
            if not FP32_DOT:
                q_far = q_far.to(q.dtype)
        # Pass 2a: sinks, positions [0, sink).
        sink_end = tl.minimum(sink, hi_pos + 1)
        for j0 in range(0, sink_end, TILE_N):
            pos = j0 + offs_n
            key_ok = pos < sink_end
            visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            # A sink before a row's window moves by that row's shift (u = 0 up to the sinks' end).
            far = visible & (pos[None, :] <= edge[:, None]) & (row_shift[:, None] != 0)
            m_i, l_i, acc = _accumulate(q, pos, key_ok, visible, m_i, l_i, acc, seq, kv_head, scale,
                                        k_ptr, v_ptr, block_table_ptr, stride_bt,
                                        stride_kb, stride_kh, stride_kt, k_dim_off,
                                        stride_vb, stride_vh, stride_vt, v_dim_off,
                                        d_ok, BLOCK_SIZE, FP32_DOT,
                                        HEAD_DIM, BLOCK_D, QUANT_BITS, GROUP_SIZE, META_AT,
                                        HIGH_SLOTS, SLOT_BYTES, HIGH_META_AT, HIGH_ROW,
                                        q_far, pos * 0, far, inv_freq_ptr, COMPACT, ROT_DIM, NEOX)
        # Pass 2b: the recent band, (q_pos - window, q_pos] per row, outside the sinks.
        band_lo = tl.maximum(lo_pos - window + 1, sink_end)
        if window == 0:
            band_lo = hi_pos + 1
        for j0 in range(band_lo, hi_pos + 1, TILE_N):
            pos = j0 + offs_n
            key_ok = pos <= hi_pos
            visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
            m_i, l_i, acc = _accumulate(q, pos, key_ok, visible, m_i, l_i, acc, seq, kv_head, scale,
                                        k_ptr, v_ptr, block_table_ptr, stride_bt,
                                        stride_kb, stride_kh, stride_kt, k_dim_off,
                                        stride_vb, stride_vh, stride_vt, v_dim_off,
                                        d_ok, BLOCK_SIZE, FP32_DOT,
                                        HEAD_DIM, BLOCK_D, QUANT_BITS, GROUP_SIZE, META_AT,
                                        HIGH_SLOTS, SLOT_BYTES, HIGH_META_AT, HIGH_ROW)
        # Pass 3: the listed pages or tokens of this tile's query block, minus what the window saw.
        n_listed = n_entries * UNIT
        for j0 in range(0, n_listed, TILE_N):
            j = j0 + offs_n
            in_list = j < n_listed
            entry = j // UNIT
            start = tl.load(sel_row + entry, mask=in_list, other=0) * UNIT
            pos = start + j % UNIT
            key_ok = in_list & (pos < seq_len) & (pos <= hi_pos)
            in_window = (pos[None, :] < sink) | (pos[None, :] > q_pos[:, None] - window)
            visible = key_ok[None, :] & (pos[None, :] <= q_pos[:, None]) & ~in_window
            # u(p_j) of a listed position at or past the sinks: non-held positions up to it. Within
            # an entry it is constant (the entry is held whole); earlier entries hold ``entry * UNIT``
            # tokens, ``below_sink`` of them (all in the first entries) below the sinks.
            key_shift = tl.maximum(start, sink) - sink - entry * UNIT + tl.minimum(below_sink, entry * UNIT)
            far = visible & (row_shift[:, None] != key_shift[None, :])
            m_i, l_i, acc = _accumulate(q, pos, key_ok, visible, m_i, l_i, acc, seq, kv_head, scale,
                                        k_ptr, v_ptr, block_table_ptr, stride_bt,
                                        stride_kb, stride_kh, stride_kt, k_dim_off,
                                        stride_vb, stride_vh, stride_vt, v_dim_off,
                                        d_ok, BLOCK_SIZE, FP32_DOT,
                                        HEAD_DIM, BLOCK_D, QUANT_BITS, GROUP_SIZE, META_AT,
                                        HIGH_SLOTS, SLOT_BYTES, HIGH_META_AT, HIGH_ROW,
                                        q_far, key_shift, far, inv_freq_ptr, COMPACT, ROT_DIM, NEOX)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quant_operands(kv) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Quantized pages' key and value byte planes (views of ``kv.raw``, ``[num_blocks, Hkv,
    block_size, R]`` uint8, strides in bytes) and the kernel constexprs that read them. Mixed
    pages: their int4 rows' planes, and the slot pool's constexprs (the pool follows each cell's
    rows: the key plane's block and head strides reach it)."""
    mixed = getattr(kv, "mixed", False)
    rows = kv.low if mixed else kv
    r = rows.row_bytes
    data = quant.code_bytes(rows.head_dim, rows.bits)
    const = dict(QUANT_BITS=rows.bits, GROUP_SIZE=min(rows.group_size, rows.head_dim), META_AT=data + (data & 1))
    if mixed:
        data8 = quant.code_bytes(kv.head_dim, 8)
        const.update(HIGH_SLOTS=kv.slots, SLOT_BYTES=kv.pool.shape[-1], HIGH_META_AT=data8 + (data8 & 1),
                     HIGH_ROW=quant.row_bytes(kv.head_dim, 8, kv.group_size))
    return rows.raw[..., :r], rows.raw[..., r:], const


def paged_attention_triton(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float, out: torch.Tensor,
                           selection: Selection | None = None, rope: Rope | None = None) -> torch.Tensor:
    compact = {}
    if rope is not None and selection is not None:
        why = triton_cannot_compact(kv, rope)
        if why is not None:
            raise NotImplementedError(f"the Triton kernel cannot read compacted positions here: {why}; "
                                      "the torch twin can (impl='torch')")
        compact = dict(inv_freq_ptr=rope.inv_freq.to(device=query.device, dtype=torch.float64), COMPACT=True,
                       ROT_DIM=rope.rotary_dim, NEOX=rope.neox)
    if kv.packed:
        k4, v4, qconst = quant_operands(kv)
        if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"attention over quantized pages takes a float32/float16/bfloat16 query, got {query.dtype}")
        query = kv.rotate_query(query)  # rotated keys are read as stored: q·k = (H q)·(H k)
    else:
        k4, v4, qconst = kv.k4, kv.v4, {}
        if k4 is None or v4 is None:
            raise ValueError(f"the Triton kernel reads 4-D strided pages; format {kv.name!r} is tiled")
    if query.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("query and out must have a unit stride on the head dimension")
    num_seqs, hq = plan.num_seqs, query.shape[1]
    max_query_len = plan.max_query_len
    if num_seqs == 0 or max_query_len == 0:
        return out
    if selection is None:
        sel_kind, query_block, nqb = SEL_DENSE, 0, 1
        sel_idx = sel_cnt = sink = window = plan.seq_lens
        dense = plan.seq_lens
        sel_strides = (0, 0, 0)
    else:
        sel_kind = SEL_PAGE if selection.granularity == "page" else SEL_TOKEN
        sel_idx, sel_cnt = selection.indices, selection.counts.contiguous()
        sink, window = selection.sink.contiguous(), selection.window.contiguous()
        dense = selection.dense.to(torch.int8).contiguous()
        query_block, nqb = selection.query_block, selection.num_query_blocks
        sel_strides = (sel_idx.stride(0), sel_idx.stride(1), sel_idx.stride(2))
    fp32_dot = _interpreting() or query.dtype == torch.float32
    grid = (num_seqs, hq, triton.cdiv(max_query_len, BLOCK_M))
    _paged_attention_kernel[grid](
        q_ptr=query, k_ptr=k4, v_ptr=v4, out_ptr=out,
        block_table_ptr=plan.block_table, seq_lens_ptr=plan.seq_lens, query_start_loc_ptr=plan.query_start_loc,
        sel_idx_ptr=sel_idx, sel_cnt_ptr=sel_cnt, sink_ptr=sink, window_ptr=window, dense_ptr=dense,
        scale=scale,
        stride_qt=query.stride(0), stride_qh=query.stride(1),
        stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_kb=k4.stride(0), stride_kh=k4.stride(1), stride_kt=k4.stride(2), stride_kd=k4.stride(3),
        stride_vb=v4.stride(0), stride_vh=v4.stride(1), stride_vt=v4.stride(2), stride_vd=v4.stride(3),
        stride_bt=plan.block_table.stride(0),
        stride_sel_b=sel_strides[0], stride_sel_h=sel_strides[1], stride_sel_q=sel_strides[2],
        num_query_blocks=nqb,
        NUM_KV_HEADS=kv.num_kv_heads,
        GROUP=hq // kv.num_kv_heads,
        HEAD_DIM=kv.head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(kv.head_dim)),
        BLOCK_SIZE=kv.block_size,
        BLOCK_M=BLOCK_M,
        SEL_KIND=sel_kind,
        QUERY_BLOCK=query_block,
        FP32_DOT=fp32_dot,
        **qconst,
        **compact,
        **launch_config(kv.head_dim, fp32_dot, qconst.get("QUANT_BITS", 0), bool(compact),
                        bool(qconst.get("HIGH_SLOTS"))),
    )
    return out
