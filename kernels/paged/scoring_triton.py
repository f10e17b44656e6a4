"""Triton kernels of the decode scoring pass (see ``scoring.py`` for what they compute).

Both launch over ``(sequence, KV head, chunk of pages)``: a program serves the ``GROUP`` query
heads that share its KV head, so each key (or page summary) is read once for the whole group.
Products and sums are float32 (keys are upcast on load), on every device and in the interpreter.
Positions and pages past a sequence's end are never loaded; their logits are ``-inf``.

Token logits also read quantized pages (``quant.QuantKVFormat``): the key byte plane, dequantized
on load by the attention kernel's ``dequant_rows`` (constexpr ``QUANT_BITS`` > 0).

Position-neutral token logits (constexpr ``NEUTRAL``, from ``rope``): each key tile is turned back
by its positions on load, with the attention kernel's ``rotate_rows`` (the query arrives turned).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .api import triton_cannot_compact
from .formats import KVFormat
from .plan import BatchPlan
from .rope import Rope
from .triton_impl import dequant_rows, high_slot_rows, quant_operands, rotate_rows

#: Cached tokens per token-logits program; its pages per program is this over the page size.
TOKENS_PER_PROGRAM = 256


def token_launch_config(head_dim: int) -> dict:
    """TILE_N (keys per loop step, independent of the page size) and warps, per head size; checked
    for registers and spills by the sm_90 compile gate (kernels/compile_gate.py)."""
    return {"TILE_N": 32 if head_dim <= 64 else 16, "num_warps": 4}


def page_launch_config(head_dim: int) -> dict:
    """PAGE_TILE (pages per program) and warps, per head size; see ``token_launch_config``."""
    return {"PAGE_TILE": 32 if head_dim <= 64 else 16, "num_warps": 4}


@triton.jit
def _token_logits_kernel(
    q_ptr,  # [B, Hq, D], unit stride on D
    k_ptr,  # keys, 4-D strided: [num_blocks, Hkv, block_size, D]
    out_ptr,  # [B, Hq, >= out_len] float32, unit stride on the position axis
    block_table_ptr,  # [B, max_pages] int32
    seq_lens_ptr,  # [B] int32
    scale,
    out_len,  # L: positions to write per row
    pages_per_program,
    stride_qb: tl.int64, stride_qh: tl.int64,
    stride_ob: tl.int64, stride_oh: tl.int64,
    stride_kb: tl.int64, stride_kh: tl.int64, stride_kt: tl.int64, stride_kd: tl.int64,
    stride_bt: tl.int64,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    TILE_N: tl.constexpr,  # positions per loop step
    QUANT_BITS: tl.constexpr = 0,  # 0: plain elements; 8 or 4: quantized pages, k_ptr the uint8 key plane
    GROUP_SIZE: tl.constexpr = 1,  # quantized: channels per scale/zero group (<= HEAD_DIM)
    META_AT: tl.constexpr = 0,  # quantized: byte offset of the first group's scale in a token row
    HIGH_SLOTS: tl.constexpr = 0,  # mixed pages: int8 slots per page (0: none; see triton_impl)
    SLOT_BYTES: tl.constexpr = 0,
    HIGH_META_AT: tl.constexpr = 0,
    inv_freq_ptr=None,  # position-neutral: RoPE's inverse frequencies [ROT_DIM // 2] float64
    NEUTRAL: tl.constexpr = False,  # position-neutral: keys turned back by their positions
    ROT_DIM: tl.constexpr = 0,
    NEOX: tl.constexpr = True,
):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = chunk * pages_per_program * BLOCK_SIZE
    hi = tl.minimum(lo + pages_per_program * BLOCK_SIZE, out_len)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_dim_off = offs_d.to(tl.int64) * stride_kd
    offs_n = tl.arange(0, TILE_N)
    q_row = q_ptr + seq * stride_qb + kv_head * GROUP * stride_qh
    o_row = out_ptr + seq * stride_ob + kv_head * GROUP * stride_oh
    for j0 in range(lo, hi, TILE_N):
        pos = j0 + offs_n
        key_ok = (pos < seq_len) & (pos < hi)
        block = tl.load(block_table_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        k_off = block * stride_kb + kv_head * stride_kh + (pos % BLOCK_SIZE).to(tl.int64) * stride_kt
        if QUANT_BITS == 0:
            k = tl.load(k_ptr + k_off[:, None] + k_dim_off[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            k = k.to(tl.float32)  # [TILE_N, BLOCK_D]
        else:
            k = dequant_rows(k_ptr, k_off, key_ok, HEAD_DIM, BLOCK_D, QUANT_BITS, GROUP_SIZE, META_AT)
            if HIGH_SLOTS > 0:  # mixed pages: tokens holding an int8 slot are read from it
                pool = block * stride_kb + kv_head * stride_kh + BLOCK_SIZE * stride_kt
                has, row = high_slot_rows(k_ptr, pool, (pos % BLOCK_SIZE).to(tl.int32), key_ok, HIGH_SLOTS, SLOT_BYTES)
                high = dequant_rows(k_ptr, row, has, HEAD_DIM, BLOCK_D, 8, GROUP_SIZE, HIGH_META_AT)
                k = tl.where(has[:, None], high, k)
        if NEUTRAL:
            k = rotate_rows(k, -pos, inv_freq_ptr, BLOCK_D, ROT_DIM, NEOX)
        for h in tl.static_range(GROUP):
            q = tl.load(q_row + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], 1)
            s = tl.where(key_ok, s * scale, float("-inf"))
            tl.store(o_row + h * stride_oh + pos, s, mask=pos < hi)


@triton.jit
def _page_logits_kernel(
    q_ptr,  # [B, Hq, D], unit stride on D
    kmin_ptr,  # [num_blocks, Hkv, D] float32, unit stride on D
    kmax_ptr,  # [num_blocks, Hkv, D] float32, unit stride on D
    out_ptr,  # [B, Hq, >= out_len] float32, unit stride on the page axis
    block_table_ptr,  # [B, max_pages] int32
    seq_lens_ptr,  # [B] int32
    scale,
    out_len,  # P: pages to write per row
    stride_qb: tl.int64, stride_qh: tl.int64,
    stride_ob: tl.int64, stride_oh: tl.int64,
    stride_lo_b: tl.int64, stride_lo_h: tl.int64,
    stride_hi_b: tl.int64, stride_hi_h: tl.int64,
    stride_bt: tl.int64,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PAGE_TILE: tl.constexpr,  # pages per program
):
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.program_id(2)
    n_pages = (tl.load(seq_lens_ptr + seq) + BLOCK_SIZE - 1) // BLOCK_SIZE

    page = chunk * PAGE_TILE + tl.arange(0, PAGE_TILE)
    page_ok = page < n_pages
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    blk = tl.load(block_table_ptr + seq * stride_bt + page, mask=page_ok, other=0).to(tl.int64)
    mask = page_ok[:, None] & d_ok[None, :]
    lo_off = blk * stride_lo_b + kv_head * stride_lo_h
    hi_off = blk * stride_hi_b + kv_head * stride_hi_h
    kmin = tl.load(kmin_ptr + lo_off[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    kmax = tl.load(kmax_ptr + hi_off[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)

    q_row = q_ptr + seq * stride_qb + kv_head * GROUP * stride_qh
    o_row = out_ptr + seq * stride_ob + kv_head * GROUP * stride_oh
    for h in tl.static_range(GROUP):
        q = tl.load(q_row + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        bound = tl.sum(tl.maximum(q * kmin, q * kmax), 1)  # [PAGE_TILE]
        bound = tl.where(page_ok, bound * scale, float("-inf"))
        tl.store(o_row + h * stride_oh + page, bound, mask=page < out_len)


def _unit_last(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"the Triton scoring kernels need {name} with a unit stride on its last axis, "
                         f"got strides {t.stride()}")


def token_logits_triton(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float, out: torch.Tensor,
                        pages_per_program: int | None = None, rope: Rope | None = None) -> torch.Tensor:
    """``out`` ``[B, Hq, L]`` float32, written in place (inputs validated by ``token_logits``).
    ``pages_per_program``: default ``TOKENS_PER_PROGRAM // block_size`` (at least 1). ``rope``:
    position-neutral, the query already turned (``triton_cannot_compact`` must allow it)."""
    neutral = {}
    if rope is not None:
        why = triton_cannot_compact(kv, rope)
        if why is not None:
            raise NotImplementedError(f"the Triton scoring kernel cannot score position-neutrally here: {why}")
        neutral = dict(inv_freq_ptr=rope.inv_freq.to(device=query.device, dtype=torch.float64), NEUTRAL=True,
                       ROT_DIM=rope.rotary_dim, NEOX=rope.neox)
    if kv.packed:
        k4, _, qconst = quant_operands(kv)
        qconst.pop("HIGH_ROW", None)  # keys only
        query = kv.rotate_query(query)  # rotated keys are read as stored: q·k = (H q)·(H k)
    else:
        k4, qconst = kv.k4, {}
    if k4 is None:
        raise ValueError(f"the Triton scoring kernel reads 4-D strided pages; format {kv.name!r} is tiled "
                         "(its tiles do not merge); use impl='torch'")
    query = query if query.stride(-1) == 1 else query.contiguous()  # one small row per sequence
    _unit_last("out", out)
    b, hq, d = query.shape
    bs, width = kv.block_size, out.shape[2]
    ppp = pages_per_program or max(1, TOKENS_PER_PROGRAM // bs)
    launch = token_launch_config(d)
    grid = (b, kv.num_kv_heads, triton.cdiv(triton.cdiv(width, bs), ppp))
    _token_logits_kernel[grid](
        q_ptr=query, k_ptr=k4, out_ptr=out,
        block_table_ptr=plan.block_table, seq_lens_ptr=plan.seq_lens,
        scale=scale, out_len=width, pages_per_program=ppp,
        stride_qb=query.stride(0), stride_qh=query.stride(1),
        stride_ob=out.stride(0), stride_oh=out.stride(1),
        stride_kb=k4.stride(0), stride_kh=k4.stride(1), stride_kt=k4.stride(2), stride_kd=k4.stride(3),
        stride_bt=plan.block_table.stride(0),
        GROUP=hq // kv.num_kv_heads, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=bs,
        **qconst, **neutral, **launch,
    )
    return out


def page_logits_triton(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, plan: BatchPlan,
                       block_size: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out`` ``[B, Hq, P]`` float32, written in place (inputs validated by ``page_logits``)."""
    query = query if query.stride(-1) == 1 else query.contiguous()
    for name, t in (("kmin", kmin), ("kmax", kmax), ("out", out)):
        _unit_last(name, t)
    b, hq, d = query.shape
    hkv, width = kmin.shape[1], out.shape[2]
    launch = page_launch_config(d)
    grid = (b, hkv, triton.cdiv(width, launch["PAGE_TILE"]))
    _page_logits_kernel[grid](
        q_ptr=query, kmin_ptr=kmin, kmax_ptr=kmax, out_ptr=out,
        block_table_ptr=plan.block_table, seq_lens_ptr=plan.seq_lens,
        scale=scale, out_len=width,
        stride_qb=query.stride(0), stride_qh=query.stride(1),
        stride_ob=out.stride(0), stride_oh=out.stride(1),
        stride_lo_b=kmin.stride(0), stride_lo_h=kmin.stride(1),
        stride_hi_b=kmax.stride(0), stride_hi_h=kmax.stride(1),
        stride_bt=plan.block_table.stride(0),
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=block_size,
        **launch,
    )
    return out
