"""Float64 references for paged attention and the decode scoring pass. Plain loops, never
optimised: the tests' oracles.

It reads the cache one token at a time through ``KVFormat.token`` and takes each row's
candidates from ``Selection.candidates``, the plain statement of what a selection means.
"""
from __future__ import annotations

import torch

from .formats import KVFormat
from .plan import BatchPlan
from .rope import Rope
from .selection import Selection


def _rows(plan: BatchPlan, hq: int, hkv: int, selection: Selection | None, block_size: int):
    """Every (sequence, query head, query row) with a candidate: ``(b, h, g, row, pos, cand)``,
    ``row`` the query's row in the batch, ``cand`` its candidate positions in order."""
    group = hq // hkv
    for b in range(plan.num_seqs):
        start, qlen, seq_len = plan.starts[b], plan.q_len(b), plan.lens[b]
        for h in range(hq):
            g = h // group
            for i in range(qlen):
                pos = seq_len - qlen + i
                cand = torch.arange(pos + 1) if selection is None else selection.candidates(b, g, i, pos, block_size)
                cand = [p for p in cand.tolist() if p < seq_len]
                if cand:
                    yield b, h, g, start + i, pos, cand


def paged_attention_reference(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float,
                              selection: Selection | None = None) -> torch.Tensor:
    """``query`` ``[T, Hq, D]`` -> ``[T, Hq, D]`` float64."""
    bs = kv.block_size
    out = torch.zeros(query.shape, dtype=torch.float64)
    for b, h, g, row, _, cand in _rows(plan, query.shape[1], kv.num_kv_heads, selection, bs):
        table = plan.block_table[b].tolist()
        kvs = [kv.token(table[p // bs], g, p % bs) for p in cand]
        keys = torch.stack([k for k, _ in kvs]).double()
        vals = torch.stack([v for _, v in kvs]).double()
        weights = torch.softmax(scale * (keys @ query[row, h].double()), dim=0)
        out[row, h] = weights @ vals
    return out


def compacted_attention_reference(query0: torch.Tensor, keys0: list[torch.Tensor], values: list[torch.Tensor],
                                  plan: BatchPlan, scale: float, selection: Selection | None, rope: Rope,
                                  block_size: int) -> torch.Tensor:
    """Attention at compacted positions from **pre-RoPE** inputs: ``query0`` ``[T, Hq, D]``, and per
    sequence ``keys0[b]`` / ``values[b]`` ``[seq_len, Hkv, D]``. Each row's candidates (in order)
    get positions 0, 1, ...; the query gets its own rank among them (right after the last one when
    it is not a candidate itself).
    RoPE is applied at those positions, in float64. Returns ``[T, Hq, D]`` float64."""
    out = torch.zeros(query0.shape, dtype=torch.float64)
    for b, h, g, row, pos, cand in _rows(plan, query0.shape[1], keys0[0].shape[1], selection, block_size):
        here = cand.index(pos) if pos in cand else len(cand)
        q = rope.rotate(query0[row, h].double(), torch.tensor(float(here)))
        keys = rope.rotate(keys0[b][cand, g].double(), torch.arange(len(cand), dtype=torch.float64))
        weights = torch.softmax(scale * (keys @ q), dim=0)
        out[row, h] = weights @ values[b][cand, g].double()
    return out


def token_logits_reference(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float,
                           rope: Rope | None = None, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Decode scoring oracle: ``query`` ``[B, Hq, D]`` (one row per sequence) -> ``[B, Hq, L]``
    float64, ``L = max(plan.lens)``: ``scale * q[b, h]·k`` of every cached position, ``-inf`` past
    each sequence's end. With ``rope``: the key at position ``p`` turned by ``-p`` and the query by
    ``-query_positions[b]`` (if given) first, in float64."""
    b_count, hq, _ = query.shape
    group = hq // kv.num_kv_heads
    bs = kv.block_size
    out = torch.full((b_count, hq, plan.max_seq_len), float("-inf"), dtype=torch.float64)
    for b in range(b_count):
        table = plan.block_table[b].tolist()
        for h in range(hq):
            q = query[b, h].double()
            if rope is not None and query_positions is not None:
                q = rope.rotate(q, torch.tensor(-float(query_positions[b])))
            for p in range(plan.lens[b]):
                k, _ = kv.token(table[p // bs], h // group, p % bs)
                k = k.double() if rope is None else rope.rotate(k.double(), torch.tensor(-float(p)))
                out[b, h, p] = scale * float(k @ q)
    return out


def page_logits_reference(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, plan: BatchPlan,
                          block_size: int, scale: float) -> torch.Tensor:
    """Quest page-bound oracle: ``query`` ``[B, Hq, D]``, ``kmin``/``kmax`` ``[num_blocks, Hkv, D]`` ->
    ``[B, Hq, P]`` float64, ``P = max ceil(lens / block_size)``: ``scale * sum_d max(q_d kmin_d,
    q_d kmax_d)`` of each page's physical block, ``-inf`` past each sequence's last page."""
    b_count, hq, _ = query.shape
    group = hq // kmin.shape[1]
    n_pages = [-(-n // block_size) for n in plan.lens]
    out = torch.full((b_count, hq, max(n_pages, default=0)), float("-inf"), dtype=torch.float64)
    for b in range(b_count):
        table = plan.block_table[b].tolist()
        for h in range(hq):
            q = query[b, h].double()
            for j in range(n_pages[b]):
                lo, hi = kmin[table[j], h // group].double(), kmax[table[j], h // group].double()
                out[b, h, j] = scale * float(torch.maximum(q * lo, q * hi).sum())
    return out
