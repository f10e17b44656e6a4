"""Float64 reference for paged attention. A plain loop, never optimised: the tests' oracle.

It reads the cache one token at a time through ``KVFormat.token`` and takes each row's
candidates from ``Selection.candidates``, the plain statement of what a selection means.
"""
from __future__ import annotations

import torch

from .formats import KVFormat
from .plan import BatchPlan
from .selection import Selection


def paged_attention_reference(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float,
                              selection: Selection | None = None) -> torch.Tensor:
    """``query`` ``[T, Hq, D]`` -> ``[T, Hq, D]`` float64."""
    t, hq, d = query.shape
    group = hq // kv.num_kv_heads
    bs = kv.block_size
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    for b in range(plan.num_seqs):
        start, qlen, seq_len = plan.starts[b], plan.q_len(b), plan.lens[b]
        table = plan.block_table[b].tolist()
        for h in range(hq):
            g = h // group
            for i in range(qlen):
                pos = seq_len - qlen + i
                cand = torch.arange(pos + 1) if selection is None else selection.candidates(b, g, i, pos, bs)
                cand = [p for p in cand.tolist() if p < seq_len]
                if not cand:
                    continue
                kvs = [kv.token(table[p // bs], g, p % bs) for p in cand]
                keys = torch.stack([k for k, _ in kvs]).double()
                vals = torch.stack([v for _, v in kvs]).double()
                weights = torch.softmax(scale * (keys @ query[start + i, h].double()), dim=0)
                out[start + i, h] = weights @ vals
    return out
