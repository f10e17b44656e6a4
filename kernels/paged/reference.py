"""Float64 reference for paged attention. A plain loop, never optimised: the tests' oracle."""
from __future__ import annotations

import torch

from .layout import kv_planes
from .selection import Selection


def paged_attention_reference(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2*D]
    block_table: torch.Tensor,  # [B, max_pages]
    seq_lens: torch.Tensor,  # [B]
    query_start_loc: torch.Tensor,  # [B+1]
    scale: float,
    selection: Selection | None = None,
) -> torch.Tensor:
    """Returns ``[T, Hq, D]`` float64."""
    planes = kv_planes(kv_cache).double()
    bs = planes.shape[3]
    hkv = planes.shape[1]
    t, hq, d = query.shape
    group = hq // hkv
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    for b in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        seq_len = int(seq_lens[b])
        first_pos = seq_len - (end - start)
        for h in range(hq):
            g = h // group
            if selection is None:
                candidates = list(range(seq_len))
            else:
                candidates = [int(p) for p in selection.token_positions(b, g, bs) if int(p) < seq_len]
            for i in range(end - start):
                pos = first_pos + i
                visible = [p for p in candidates if p <= pos]
                if not visible:
                    continue
                keys = torch.stack([planes[int(block_table[b, p // bs]), g, 0, p % bs] for p in visible])
                vals = torch.stack([planes[int(block_table[b, p // bs]), g, 1, p % bs] for p in visible])
                q = query[start + i, h].double()
                weights = torch.softmax(scale * (keys @ q), dim=0)
                out[start + i, h] = weights @ vals
    return out
