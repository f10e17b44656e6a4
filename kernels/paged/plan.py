"""The batch plan: one step's ragged batch, as every paged kernel sees it.

Built once per engine step (by an adapter, from its engine's metadata) and shared by all layers.
Host copies of the small per-sequence arrays are made here, once, so that no layer syncs with
the device to learn a length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPlan:
    """Sequence ``b`` has ``q_lens[b]`` new query tokens, rows ``[query_start_loc[b],
    query_start_loc[b+1])`` of the query tensor, at positions ``seq_lens[b] - q_lens[b] ...
    seq_lens[b] - 1``; its pages are ``block_table[b, :ceil(seq_lens[b] / block_size)]``.

    query_start_loc: ``[B+1]`` int32.  seq_lens: ``[B]`` int32.  block_table: ``[B, max_pages]`` int32.
    engine: opaque data an engine's own kernel needs for this batch (e.g. a CPU op's work plan).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    starts: tuple[int, ...] = field(default=())  # host copy of query_start_loc
    lens: tuple[int, ...] = field(default=())  # host copy of seq_lens
    engine: Any = None
    #: Tensors derived from this plan alone (index maps, masks), built by the first layer that
    #: needs them and reused by the step's other layers: see ``memo``.
    _derived: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        b = self.seq_lens.shape[0]
        if self.query_start_loc.shape[0] != b + 1 or self.block_table.shape[0] < b:
            raise ValueError(f"batch mismatch: seq_lens {b}, query_start_loc {self.query_start_loc.shape[0]}, "
                             f"block_table rows {self.block_table.shape[0]}")
        if not self.starts:
            object.__setattr__(self, "starts", tuple(self.query_start_loc.tolist()))
        if not self.lens:
            object.__setattr__(self, "lens", tuple(self.seq_lens.tolist()))
        if len(self.starts) != b + 1 or len(self.lens) != b:
            raise ValueError("host copies disagree with the device arrays")

    @classmethod
    def from_lists(cls, q_lens: list[int], seq_lens: list[int], block_table: torch.Tensor, engine: Any = None) -> "BatchPlan":
        if len(q_lens) != len(seq_lens) or any(q > s or q < 0 for q, s in zip(q_lens, seq_lens)):
            raise ValueError(f"need 0 <= q_len <= seq_len per sequence: q_lens={q_lens}, seq_lens={seq_lens}")
        starts = [0]
        for q in q_lens:
            starts.append(starts[-1] + q)
        dev = block_table.device
        return cls(torch.tensor(starts, dtype=torch.int32, device=dev), torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                   block_table, tuple(starts), tuple(seq_lens), engine)

    def memo(self, key: tuple, build: Callable[[], T]) -> T:
        """``build()`` once per plan and ``key``: what a kernel derives from the batch alone (not
        from a layer's queries or cache) is computed by the step's first layer and read by the
        others. ``key`` must name everything besides the plan that the result depends on."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    @property
    def num_seqs(self) -> int:
        return len(self.lens)

    @property
    def num_tokens(self) -> int:
        return self.starts[-1]

    def q_len(self, b: int) -> int:
        return self.starts[b + 1] - self.starts[b]

    def positions(self) -> torch.Tensor:
        """The absolute position of every query row, int64 ``[num_tokens]`` (CPU)."""
        parts = [torch.arange(s - self.q_len(b), s) for b, s in enumerate(self.lens)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    @property
    def max_query_len(self) -> int:
        return max((self.q_len(b) for b in range(self.num_seqs)), default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.lens, default=0)

    def token_rows(self, keep: list[bool]) -> torch.Tensor:
        """Query-row indices (int64) of the sequences where ``keep`` is set, in order."""
        rows = [torch.arange(self.starts[b], self.starts[b + 1]) for b in range(self.num_seqs) if keep[b]]
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)

    def subset(self, keep: list[bool], engine: Any = None) -> "BatchPlan":
        """The plan of the kept sequences, their query rows renumbered from 0."""
        idx = [b for b in range(self.num_seqs) if keep[b]]
        q_lens = [self.q_len(b) for b in idx]
        table = self.block_table[torch.tensor(idx, dtype=torch.long, device=self.block_table.device)]
        return BatchPlan.from_lists(q_lens, [self.lens[b] for b in idx], table, engine)
