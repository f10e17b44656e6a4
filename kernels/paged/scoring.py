"""Decode-time criticality scores over a paged KV cache: the scoring pass of TokenSelect and Quest.

At decode each sequence has exactly one new query row. A selector ranks what to attend to from

- ``token_logits``: ``scale * q·k`` for every cached token, per query head (TokenSelect);
- ``page_logits``: per page, the upper bound ``scale * sum_d max(q_d kmin_d, q_d kmax_d)`` of
  ``scale * q·k`` over the page's keys, from per-page key minima and maxima (Quest).

Both read the cache where it lies (any ``KVFormat``; per-page summaries indexed by physical
block), return ``[B, Hq, N]`` float32 with ``-inf`` past each sequence's end, and dispatch like
``paged_attention``: Triton on CUDA tensors, the torch twin below elsewhere. The torch twin reads
the keys ``chunk_pages`` pages at a time for the whole batch, so it never holds a dense copy of a
long context. The float64 oracles are ``token_logits_reference`` and ``page_logits_reference``.
"""
from __future__ import annotations

from typing import Literal

import torch

from .api import triton_cannot_compact
from .formats import KVFormat
from .plan import BatchPlan
from .rope import Rope

Impl = Literal["auto", "triton", "torch"]

#: Elements of the ``[B, Hq, pages, D]`` products the page twin materialises per chunk (16 MiB).
PAGE_PRODUCT_ELEMS = 1 << 22


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_query(query: torch.Tensor, num_kv_heads: int, head_dim: int, plan: BatchPlan, what: str) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [seqs, q_heads, head_dim] (one decode row per sequence), "
                         f"got shape {tuple(query.shape)}")
    b, hq, d = query.shape
    if not query.is_floating_point():
        raise ValueError(f"query must be a floating tensor, got {query.dtype}")
    if d != head_dim:
        raise ValueError(f"query head_dim {d} != {what} head_dim {head_dim}")
    if hq % num_kv_heads:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {num_kv_heads}")
    if b != plan.num_seqs:
        raise ValueError(f"query has {b} rows but the plan has {plan.num_seqs} sequences; "
                         "scoring takes exactly one (decode) row per sequence")


def _check_table(plan: BatchPlan, block_size: int) -> int:
    """The widest block-table prefix any sequence uses, in pages."""
    pages = _cdiv(plan.max_seq_len, block_size)
    if plan.block_table.dim() != 2 or plan.block_table.shape[1] < pages:
        raise ValueError(f"block_table {tuple(plan.block_table.shape)} has fewer than the {pages} pages "
                         f"a sequence of {plan.max_seq_len} tokens needs at block_size {block_size}")
    return pages


def _output(out: torch.Tensor | None, query: torch.Tensor, n: int) -> torch.Tensor:
    """``out[:, :, :n]``, or a fresh ``[B, Hq, n]`` float32 buffer."""
    b, hq = query.shape[:2]
    if out is None:
        return torch.empty(b, hq, n, dtype=torch.float32, device=query.device)
    if out.dtype != torch.float32 or out.dim() != 3 or tuple(out.shape[:2]) != (b, hq) or out.shape[2] < n:
        raise ValueError(f"out must be float32 [{b}, {hq}, >= {n}], got {out.dtype} {tuple(out.shape)}")
    if out.device != query.device:
        raise ValueError(f"out is on {out.device} but query on {query.device}")
    return out[:, :, :n]


def _choose(impl: Impl, query: torch.Tensor) -> str:
    if impl == "auto":
        return "triton" if query.is_cuda else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return impl


# ----------------------------------------------------------------------------- token logits

def token_logits(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float, out: torch.Tensor | None = None,
                 *, impl: Impl = "auto", chunk_pages: int = 64, rope: Rope | None = None,
                 query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token logits of each sequence's decode query against its cached keys.

    query: ``[B, Hq, D]``, row ``b`` the one query of sequence ``b`` of ``plan`` (its
        ``query_start_loc`` is not read); any floating dtype.
    kv: the layer's paged cache; ``plan.block_table`` and ``plan.lens``/``seq_lens`` place the keys.
    out: optional float32 ``[B, Hq, >= L]``; ``[:, :, :L]`` is overwritten in place.
    chunk_pages: pages per step of the torch twin (memory ``B x Hkv x chunk_pages`` cells).
    rope: score on a **position-neutral** basis: each cached key (rotated by the engine at its
        position ``p``) is turned back by ``-p``, and the query by ``-query_positions[b]`` (int
        ``[B]``; None: the query is given un-rotated already), so every pair is compared as if
        both sat at position 0, whatever their distance. The Triton kernel turns each key tile on
        load; Hadamard-rotated int4 keys take the torch twin under ``impl="auto"``.

    Returns ``[B, Hq, L]`` float32, ``L = max(plan.lens)``: ``scale * q[b, h]·k[b, h // G, p]``
    for ``p < lens[b]`` (``G = Hq // Hkv``), ``-inf`` for ``p >= lens[b]``. Higher = more critical.
    """
    _check_query(query, kv.num_kv_heads, kv.head_dim, plan, "cache")
    if query.device != kv.device:
        raise ValueError(f"query is on {query.device} but the cache on {kv.device}")
    if chunk_pages < 1:
        raise ValueError(f"chunk_pages must be >= 1, got {chunk_pages}")
    _check_table(plan, kv.block_size)
    res = _output(out, query, plan.max_seq_len)
    if res.numel() == 0:
        return res
    if rope is not None and query_positions is not None:
        if tuple(query_positions.shape) != (query.shape[0],):
            raise ValueError(f"query_positions must be [{query.shape[0]}], got {tuple(query_positions.shape)}")
        query = rope.rotate(query.float(), -query_positions.to(query.device)[:, None])
    chosen = _choose(impl, query)
    if chosen == "triton" and rope is not None and triton_cannot_compact(kv, rope) and impl == "auto":
        chosen = "torch"  # e.g. Hadamard-rotated int4 keys: the twin turns them back first
    if chosen == "triton":
        from .scoring_triton import token_logits_triton

        return token_logits_triton(query, kv, plan, scale, res, rope=rope)
    return _token_logits_torch(query, kv, plan, scale, res, chunk_pages, rope)


def _token_logits_torch(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float, out: torch.Tensor,
                        chunk_pages: int, rope: Rope | None = None) -> torch.Tensor:
    """The torch twin: ``out`` ``[B, Hq, L]`` float32, filled chunk by chunk of pages."""
    b, hq, d = query.shape
    hkv, bs, dev = kv.num_kv_heads, kv.block_size, kv.device
    group, width = hq // hkv, out.shape[2]
    lens = plan.seq_lens[:b].to(device=dev, dtype=torch.int64)
    n_pages = (lens + bs - 1) // bs
    table = plan.block_table[:b].to(device=dev, dtype=torch.int64)
    q = query.to(torch.float32).reshape(b, hkv, group, d)  # one [G, D] block per KV head
    heads = torch.arange(hkv, device=dev)[None, :, None]
    # Rows that all read one sequence's pages (a prompt's query blocks, scored at once) gather and
    # re-position each key once for all of them; their lengths still mask each row.
    rows_of_one = b > 1 and bool((table == table[:1]).all())
    rb = 1 if rows_of_one else b
    for p0 in range(0, _cdiv(width, bs), chunk_pages):
        p1 = min(p0 + chunk_pages, _cdiv(width, bs))
        n = p1 - p0
        page = torch.arange(p0, p1, device=dev)
        # Pages past a sequence's end may hold anything in the table: read block 0 there (every
        # cache has one) and mask its logits.
        live = page[None, :] < (n_pages.max() if rows_of_one else n_pages)[..., None]
        blocks = torch.where(live, table[:rb, p0:p1], 0)  # [B or 1, n]
        k, _ = kv.gather(blocks[:, None, :].expand(rb, hkv, n), heads.expand(rb, hkv, n), torch.float32)
        if rope is not None:  # keys back to position 0: [B, Hkv, n, bs, D] turned by -(page * bs + offset)
            k = rope.rotate(k, -(page[:, None] * bs + torch.arange(bs, device=dev)))
        k = k.reshape(rb, hkv, n * bs, d).transpose(-1, -2)  # [B or 1, Hkv, D, n * bs]
        if rows_of_one:  # every row's query heads against the one sequence's keys: [Hkv, B * G, n * bs]
            s = torch.matmul(q.permute(1, 0, 2, 3).reshape(hkv, b * group, d), k[0])
            s = s.view(hkv, b, group, n * bs).transpose(0, 1).reshape(b, hq, n * bs)
        else:
            s = torch.matmul(q, k).reshape(b, hq, n * bs)  # [B, Hkv, G, n * bs]
        lo, hi = p0 * bs, min(p1 * bs, width)
        pos = torch.arange(lo, hi, device=dev)
        s = s[:, :, : hi - lo].mul_(scale)
        out[:, :, lo:hi] = s.masked_fill_(pos[None, None, :] >= lens[:, None, None], float("-inf"))
    return out


# ----------------------------------------------------------------------------- page logits

def page_logits(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, plan: BatchPlan, block_size: int,
                scale: float, out: torch.Tensor | None = None, *, impl: Impl = "auto") -> torch.Tensor:
    """Per-page upper bounds of each sequence's decode logits (Quest's page criticality).

    query: ``[B, Hq, D]``, one row per sequence of ``plan``.
    kmin, kmax: ``[num_blocks, Hkv, D]`` float32, key minima/maxima per physical page and KV head
        (``lcx_plugin.state.PageSummaries``); only blocks a sequence uses are read.
    out: optional float32 ``[B, Hq, >= P]``; ``[:, :, :P]`` is overwritten in place.

    Returns ``[B, Hq, P]`` float32, ``P = max_b ceil(lens[b] / block_size)``: for page ``j`` of
    sequence ``b`` (physical block ``blk = block_table[b, j]``) and KV head ``g = h // G``,
    ``scale * sum_d max(q_d * kmin[blk, g, d], q_d * kmax[blk, g, d])``, which is at least every
    ``scale * q·k`` over the page's keys; ``-inf`` for pages past the sequence's last.
    """
    if kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(f"kmin and kmax must both be [num_blocks, kv_heads, head_dim], got "
                         f"{tuple(kmin.shape)} and {tuple(kmax.shape)}")
    if not (kmin.is_floating_point() and kmax.is_floating_point()):
        raise ValueError(f"kmin and kmax must be floating tensors, got {kmin.dtype} and {kmax.dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _check_query(query, kmin.shape[1], kmin.shape[2], plan, "page summary")
    if not (query.device == kmin.device == kmax.device):
        raise ValueError(f"query, kmin and kmax must share a device: {query.device}, {kmin.device}, {kmax.device}")
    pages = _check_table(plan, block_size)
    res = _output(out, query, pages)
    if res.numel() == 0:
        return res
    if _choose(impl, query) == "triton":
        from .scoring_triton import page_logits_triton

        return page_logits_triton(query, kmin, kmax, plan, block_size, scale, res)
    return _page_logits_torch(query, kmin, kmax, plan, block_size, scale, res)


def _page_logits_torch(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, plan: BatchPlan,
                       block_size: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """The torch twin: ``out`` ``[B, Hq, P]`` float32, the whole batch at once per chunk of pages."""
    b, hq, d = query.shape
    hkv, dev, width = kmin.shape[1], query.device, out.shape[2]
    group = hq // hkv
    # sum_d max(q_d lo_d, q_d hi_d) = q+ . hi + q- . lo (hi >= lo: a positive q_d picks hi_d, a
    # negative one lo_d), with q+ = max(q, 0) and q- = min(q, 0). Each query head is laid out as a
    # row over all KV heads' dimensions, zero outside its own head's (block-diagonal), so one
    # batched product per bound gives [B, Hq, pages] straight from the gathered pages' rows
    # ([B, pages, Hkv * D], read transposed): no transpose copy, and the product's long side is the
    # pages (a product whose long side is a group's few query heads ran 5x slower here).
    q = (query.to(torch.float32) * scale).reshape(b, hkv, group, d)  # scale > 0: it commutes with the bound
    if hkv == 1:  # one KV head (a head split's retrieval side): nothing to keep apart
        q_pos, q_neg = q.clamp(min=0).reshape(b, hq, d), q.clamp(max=0).reshape(b, hq, d)
    else:
        eye = torch.eye(hkv, device=dev, dtype=torch.float32)
        q_pos = torch.einsum("bkgd,kl->bkgld", q.clamp(min=0), eye).reshape(b, hq, hkv * d)
        q_neg = torch.einsum("bkgd,kl->bkgld", q.clamp(max=0), eye).reshape(b, hq, hkv * d)
    chunk = max(1, PAGE_PRODUCT_ELEMS // max(1, b * hkv * d))
    for p0 in range(0, width, chunk):
        p1 = min(p0 + chunk, width)
        blocks, dead = plan.memo(("page_logits.chunk", block_size, b, p0, p1, str(dev)),
                                 lambda: _page_chunk(plan, b, block_size, p0, p1, dev))
        hi = kmax.index_select(0, blocks).to(torch.float32).view(b, p1 - p0, hkv * d).transpose(1, 2)
        lo = kmin.index_select(0, blocks).to(torch.float32).view(b, p1 - p0, hkv * d).transpose(1, 2)
        out[:, :, p0:p1] = torch.bmm(q_pos, hi).baddbmm_(q_neg, lo).masked_fill_(dead, float("-inf"))  # [B, Hq, n]
    return out


def _page_chunk(plan: BatchPlan, b: int, block_size: int, p0: int, p1: int, dev: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages ``[p0, p1)`` of the first ``b`` sequences: their blocks, flat ``[b * n]`` (block 0,
    which every cache has, past a sequence's last page: its bounds are read, then masked), and
    ``[b, 1, n]`` where a sequence has no such page."""
    n_pages = (plan.seq_lens[:b].to(device=dev, dtype=torch.int64) + block_size - 1) // block_size
    table = plan.block_table[:b].to(device=dev, dtype=torch.int64)
    live = torch.arange(p0, p1, device=dev)[None, :] < n_pages[:, None]  # [B, n]
    return torch.where(live, table[:, p0:p1], 0).reshape(-1), ~live[:, None, :]
