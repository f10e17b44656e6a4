"""Selections: which cached tokens each (sequence, KV head) attends to.

Every long-context method in lcx is a selector that produces one of these; the paged
kernels consume it. ``None`` means dense: every cached token, under the causal mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["page", "token"]


@dataclass(frozen=True)
class Selection:
    """Per-(sequence, KV head) index lists.

    granularity "page": ``indices`` are logical page numbers (columns of the block table);
        every token of a selected page is a candidate.
    granularity "token": ``indices`` are logical token positions.

    indices: ``[num_seqs, num_kv_heads, max_selected]`` int32, ascending and unique in the
        first ``counts[b, h]`` entries; the rest is ignored.
    counts: ``[num_seqs, num_kv_heads]`` int32.

    The causal mask still applies: a query at position p never sees a selected token > p.
    A query whose candidate set is empty gets a zero output.
    """

    granularity: Granularity
    indices: torch.Tensor
    counts: torch.Tensor

    def __post_init__(self) -> None:
        if self.granularity not in ("page", "token"):
            raise ValueError(f"granularity must be 'page' or 'token', got {self.granularity!r}")
        if self.indices.dim() != 3 or self.counts.dim() != 2:
            raise ValueError(
                f"indices must be [seqs, kv_heads, max_sel] and counts [seqs, kv_heads]; got "
                f"{tuple(self.indices.shape)} and {tuple(self.counts.shape)}"
            )
        if self.indices.shape[:2] != self.counts.shape:
            raise ValueError(
                f"indices {tuple(self.indices.shape)} and counts {tuple(self.counts.shape)} "
                "disagree on (seqs, kv_heads)"
            )

    def token_positions(self, b: int, h: int, block_size: int) -> torch.Tensor:
        """The candidate token positions of (sequence b, kv head h), ascending (int64)."""
        idx = self.indices[b, h, : int(self.counts[b, h])].long()
        if self.granularity == "token":
            return idx
        offs = torch.arange(block_size, device=idx.device)
        return (idx[:, None] * block_size + offs[None, :]).reshape(-1)
