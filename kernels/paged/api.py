"""The public entry point: one signature, dispatched to the Triton kernel or the torch twin."""
from __future__ import annotations

from typing import Literal

import torch

from .layout import KVLayout
from .selection import Selection

Impl = Literal["auto", "triton", "torch"]


def _check(query, kv_cache, block_table, seq_lens, query_start_loc, out) -> None:
    lay = KVLayout.of(kv_cache)
    t, hq, d = query.shape
    if d != lay.head_dim:
        raise ValueError(f"query head_dim {d} != cache head_dim {lay.head_dim}")
    if hq % lay.num_kv_heads:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {lay.num_kv_heads}")
    if out.shape[0] < t or out.shape[1:] != query.shape[1:]:
        raise ValueError(f"out {tuple(out.shape)} cannot hold query {tuple(query.shape)}")
    b = seq_lens.shape[0]
    if query_start_loc.shape[0] != b + 1 or block_table.shape[0] < b:
        raise ValueError(
            f"batch mismatch: seq_lens {b}, query_start_loc {query_start_loc.shape[0]}, "
            f"block_table rows {block_table.shape[0]}"
        )


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2*D], see layout.py
    block_table: torch.Tensor,  # [B, max_pages] int32: logical page -> physical block
    seq_lens: torch.Tensor,  # [B] int32: context length including this step's query tokens
    query_start_loc: torch.Tensor,  # [B+1] int32: cumulative query token offsets
    scale: float,
    out: torch.Tensor,  # [>=T, Hq, D], written in place
    selection: Selection | None = None,
    *,
    impl: Impl = "auto",
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its paged context.

    Query token i of sequence b sits at position ``seq_lens[b] - qlen_b + i`` and attends to
    cached positions <= its own, restricted to ``selection`` when one is given (see
    ``Selection``). Covers prefill (qlen = seq_len), chunked prefill or prefix reuse
    (qlen < seq_len), decode (qlen = 1) and ragged mixtures of them, with GQA.
    ``impl="auto"`` takes Triton on CUDA tensors and the torch twin elsewhere.
    """
    _check(query, kv_cache, block_table, seq_lens, query_start_loc, out)
    if impl == "auto":
        impl = "triton" if query.is_cuda else "torch"
    if impl == "triton":
        from .triton_impl import paged_attention_triton

        return paged_attention_triton(
            query, kv_cache, block_table, seq_lens, query_start_loc, scale, out, selection,
            max_query_len=max_query_len,
        )
    if impl == "torch":
        from .torch_impl import paged_attention_torch

        return paged_attention_torch(query, kv_cache, block_table, seq_lens, query_start_loc, scale, out, selection)
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
