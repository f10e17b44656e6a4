"""Selections: which cached tokens each (sequence, KV head, query) attends to.

Every long-context method in lcx is a selector that produces one of these; the paged kernels
consume it. ``None`` means dense: every cached token, under the causal mask.

For the query at absolute position ``p`` of sequence ``b``, row ``i`` of that sequence's new
tokens, on KV head ``g``, the candidate keys are

- every position ``<= p`` when ``dense[b, g]`` is set (the dense-head mark); otherwise
- the **window**: positions ``< sink[b, g]`` and positions in ``(p - window[b, g], p]``, relative
  to each query, so exact for every row of a chunked prefill; plus
- the **list** of query block ``i // query_block`` (block 0 when ``query_block == 0``): pages
  (``granularity="page"``: every token of each listed page) or token positions.

The causal mask always applies on top (nothing ``> p``). A listed position inside the row's
window is counted once. A row with no candidate gets a zero output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Granularity = Literal["page", "token"]

#: The Triton kernel tiles query rows by this many; a query block must be a multiple of it.
QUERY_TILE = 16


def _int_tensor(x, b: int, h: int, device, dtype=torch.int32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.shape != (b, h):
            raise ValueError(f"per-head selection parameter must be [seqs={b}, kv_heads={h}], got {tuple(x.shape)}")
        return x.to(device=device, dtype=dtype)
    return torch.full((b, h), x, dtype=dtype, device=device)


def lists_from_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` ``[..., N]`` bool -> the kept units as ascending lists: ``indices [..., K]`` int32
    (K = the most kept anywhere; entries past the count are unspecified) and ``counts [...]`` int32."""
    counts = keep.sum(-1).to(torch.int32)
    width = int(counts.max()) if counts.numel() else 0
    idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    return idx.to(torch.int32), counts


@dataclass(frozen=True)
class Selection:
    """Per-(sequence, KV head [, query block]) candidate keys; see the module docstring.

    indices: ``[B, Hkv, NQB, max_sel]`` int32, ascending and unique in the first
        ``counts[b, g, q]`` entries (the rest is ignored).
    counts: ``[B, Hkv, NQB]`` int32.
    sink, window: ``[B, Hkv]`` int32 (0 = none).
    dense: ``[B, Hkv]`` bool.
    query_block: rows per query block of the list axis; 0 means one list for all rows. A
        multiple of ``QUERY_TILE``.
    """

    granularity: Granularity
    indices: torch.Tensor
    counts: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    dense: torch.Tensor
    query_block: int = 0
    #: Kernels' index work derived from this selection, memoised: a selection shared by every layer
    #: of a step is prepared once.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.granularity not in ("page", "token"):
            raise ValueError(f"granularity must be 'page' or 'token', got {self.granularity!r}")
        if self.indices.dim() != 4 or self.counts.dim() != 3 or self.indices.shape[:3] != self.counts.shape:
            raise ValueError(f"indices must be [seqs, kv_heads, query_blocks, max_sel] and counts "
                             f"[seqs, kv_heads, query_blocks]; got {tuple(self.indices.shape)} and "
                             f"{tuple(self.counts.shape)}")
        b, h = self.counts.shape[:2]
        for name in ("sink", "window", "dense"):
            t = getattr(self, name)
            if t.shape != (b, h):
                raise ValueError(f"{name} must be [seqs={b}, kv_heads={h}], got {tuple(t.shape)}")
        if self.indices.dtype != torch.int32 or self.counts.dtype != torch.int32:
            raise ValueError(f"indices and counts must be int32, got {self.indices.dtype}, {self.counts.dtype}")
        if self.query_block < 0 or self.query_block % QUERY_TILE:
            raise ValueError(f"query_block={self.query_block} must be 0 or a multiple of {QUERY_TILE}")
        if self.query_block == 0 and self.counts.shape[2] != 1:
            raise ValueError(f"query_block=0 means one list per head, but counts has {self.counts.shape[2]} query blocks")

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def build(cls, num_seqs: int, num_kv_heads: int, *, granularity: Granularity = "page",
              indices: torch.Tensor | None = None, counts: torch.Tensor | None = None,
              sink=0, window=0, dense=False, query_block: int = 0,
              device: torch.device | str = "cpu") -> "Selection":
        """A selection with defaults filled in: no lists, no window, no dense heads. ``sink``,
        ``window`` and ``dense`` take a number/bool (every head) or a ``[B, Hkv]`` tensor;
        ``indices``/``counts`` may omit the query-block axis (``[B, Hkv, max_sel]``)."""
        b, h = num_seqs, num_kv_heads
        if indices is None:
            indices = torch.zeros(b, h, 1, 0, dtype=torch.int32, device=device)
            counts = torch.zeros(b, h, 1, dtype=torch.int32, device=device)
        elif counts is None:
            raise ValueError("indices given without counts")
        if indices.dim() == 3:
            indices, counts = indices[:, :, None], counts[:, :, None]
        return cls(granularity, indices.to(device=device, dtype=torch.int32),
                   counts.to(device=device, dtype=torch.int32),
                   _int_tensor(sink, b, h, device), _int_tensor(window, b, h, device),
                   _int_tensor(dense, b, h, device, torch.bool), query_block)

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_query_blocks(self) -> int:
        return self.counts.shape[2]

    @property
    def only_page_lists(self) -> bool:
        """One list of pages per (sequence, head), every head at least one page, no window, no
        dense marks: what an engine's own paged op can run from rewritten block tables (at
        decode, where every listed page lies wholly before the query)."""
        return (self.granularity == "page" and self.query_block == 0 and not bool(self.dense.any())
                and not self.has_window and bool((self.counts > 0).all()))

    @property
    def has_window(self) -> bool:
        return bool(((self.sink > 0) | (self.window > 0)).any())

    def query_block_of(self, row: int) -> int:
        return 0 if self.query_block == 0 else min(row // self.query_block, self.num_query_blocks - 1)

    def listed_positions(self, b: int, g: int, qb: int, block_size: int) -> torch.Tensor:
        """The listed token positions of (sequence b, KV head g, query block qb), ascending int64."""
        idx = self.indices[b, g, qb, : int(self.counts[b, g, qb])].long()
        if self.granularity == "token":
            return idx
        offs = torch.arange(block_size, device=idx.device)
        return (idx[:, None] * block_size + offs[None, :]).reshape(-1)

    def candidates(self, b: int, g: int, row: int, pos: int, block_size: int) -> torch.Tensor:
        """Every candidate position of one query row, ascending and unique (int64, CPU).
        The definition, written plainly: the float64 reference and the tests use it."""
        if bool(self.dense[b, g]):
            return torch.arange(pos + 1)
        sink, window = int(self.sink[b, g]), int(self.window[b, g])
        chosen = set(range(min(sink, pos + 1)))
        chosen.update(range(max(0, pos - window + 1), pos + 1))
        listed = self.listed_positions(b, g, self.query_block_of(row), block_size).cpu().tolist()
        chosen.update(p for p in listed if p <= pos)
        return torch.tensor(sorted(chosen), dtype=torch.int64)

    def rows(self, keep: torch.Tensor) -> "Selection":
        """The selection of the sequences where ``keep`` (``[B]`` bool) is set, in order."""
        idx = keep.nonzero().flatten().to(self.counts.device)
        return Selection(self.granularity, self.indices[idx], self.counts[idx], self.sink[idx],
                         self.window[idx], self.dense[idx], self.query_block)
