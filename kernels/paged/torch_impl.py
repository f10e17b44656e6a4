"""Torch twin of the paged attention kernel: the CPU path.

Works sequence by sequence on whole pages: the pages of a sequence are gathered with one
``index_select`` over the block table (page-granular, never per token) and attention runs
through ``scaled_dot_product_attention`` in float32. A selection becomes a boolean mask over
the gathered pages, so the twin computes exactly what the Triton kernel computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import kv_planes
from .selection import Selection


def _sequence_kv(planes: torch.Tensor, pages: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one sequence, each ``[Hkv, seq_len, D]`` float32."""
    n = pages.shape[0]
    first = int(pages[0])
    if n == 1 or bool((pages[1:] - pages[:-1] == 1).all()):
        cells = planes[first : first + n]  # contiguous run of blocks: a view, no gather
    else:
        cells = planes.index_select(0, pages)
    _, hkv, _, bs, d = cells.shape
    # One pass that both upcasts and lays the planes out contiguously; `.float()` would keep the
    # permuted strides and force a second copy in the reshape (10x slower at 6k tokens).
    kv = cells.permute(2, 1, 0, 3, 4).to(torch.float32, memory_format=torch.contiguous_format)
    kv = kv.reshape(2, hkv, n * bs, d)[:, :, :seq_len]  # a view unless the cache was float32 already
    return kv[0], kv[1]


def _selection_mask(selection: Selection, b: int, hkv: int, seq_len: int, bs: int) -> torch.Tensor:
    """``[Hkv, seq_len]`` bool: which positions each KV head may attend to."""
    mask = torch.zeros(hkv, seq_len, dtype=torch.bool)
    for g in range(hkv):
        pos = selection.token_positions(b, g, bs).cpu()
        mask[g, pos[pos < seq_len]] = True
    return mask


def paged_attention_torch(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2*D]
    block_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]
    selection: Selection | None = None,
) -> torch.Tensor:
    planes = kv_planes(kv_cache)
    hkv, bs = planes.shape[1], planes.shape[3]
    hq = query.shape[1]
    group = hq // hkv
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        qlen = end - start
        if qlen == 0:
            continue
        n_pages = -(-seq_len // bs)
        k, v = _sequence_kv(planes, block_table[b, :n_pages].long(), seq_len)
        # 4-D [1, heads, tokens, D]: with a batch dimension SDPA takes its fused CPU kernels for GQA
        # (3-D inputs fall back to a path several times slower).
        q = query[start:end].transpose(0, 1).float()[None]  # [1, Hq, qlen, D]
        k, v = k[None], v[None]
        mask, causal = None, False
        if qlen > 1 and qlen == seq_len and selection is None:
            causal = True  # plain prefill: lets SDPA take its fused causal path, no mask in memory
        elif qlen > 1:
            q_pos = torch.arange(seq_len - qlen, seq_len)
            mask = (torch.arange(seq_len)[None, :] <= q_pos[:, None])[None, None]  # [1, 1, qlen, L]
        if selection is not None:
            sel = _selection_mask(selection, b, hkv, seq_len, bs).repeat_interleave(group, 0)[None, :, None, :]
            mask = sel if mask is None else (mask & sel)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=group > 1)
        if selection is not None:
            # Only a selection can leave a query row with no visible key (under the causal mask
            # alone every row sees position 0). Such rows come out NaN; the kernel contract is zero.
            empty = ~mask.expand(1, hq, qlen, seq_len).any(-1)
            o = o.masked_fill(empty[..., None], 0.0)
        out[start:end] = o[0].transpose(0, 1).to(out.dtype)
    return out
