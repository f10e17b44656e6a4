"""Homes for the state methods keep between steps.

- ``PageSummaries`` (per layer, per physical page): key min, max and sum per (page, KV head),
  written from the raw keys whenever the cache is written. Indexed by physical block, so they
  follow the page through batch reordering, preemption and prefix caching; a page that is
  written again from its first slot starts a fresh summary.
- ``RequestStates`` (per engine process, per request): a small dict per (request, layer), keyed
  by the engine's stable request id; the adapter drops a request's entry when the engine
  reports it finished or preempted, so nothing leaks across requests.
- Per-layer data (head patterns, calibration) is loaded once by a loader module into the layer
  core, never with pickle.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from lcx_plugin.kernels.paged import cpu_op


class PageSummaries:
    """Per-(page, KV head) key summaries of one layer: ``min``, ``max``, ``sum`` ``[num_blocks, Hkv, D]``
    float32 and ``count`` ``[num_blocks]`` (tokens summarised per page)."""

    def __init__(self, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, num_kv_heads, head_dim)
        self.block_size = block_size
        self.min = torch.full(shape, float("inf"), device=device)
        self.max = torch.full(shape, float("-inf"), device=device)
        self.sum = torch.zeros(shape, device=device)
        self.count = torch.zeros(num_blocks, dtype=torch.int32, device=device)

    def update(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Fold new keys ``[T, Hkv, D]`` written at ``slot_mapping`` into their pages' summaries
        (on a CPU in one native call, ``cpu_op.summaries_update``, when the op is built)."""
        if self.min.device.type == "cpu" and key.device.type == "cpu" and cpu_op.available():
            cpu_op.summaries_update(self, key, slot_mapping)
            return
        slots = slot_mapping[: key.shape[0]].long()
        keep = slots >= 0
        slots, key = slots[keep], key[keep].float()
        if slots.numel() == 0:
            return
        blocks, offsets = slots // self.block_size, slots % self.block_size
        fresh = blocks[offsets == 0]  # a page written from its first slot holds new content
        if fresh.numel():
            self.min[fresh] = float("inf")
            self.max[fresh] = float("-inf")
            self.sum[fresh] = 0.0
            self.count[fresh] = 0
        idx = blocks[:, None, None].expand_as(key)
        self.min.scatter_reduce_(0, idx, key, "amin")
        self.max.scatter_reduce_(0, idx, key, "amax")
        self.sum.index_add_(0, blocks, key)
        self.count.index_add_(0, blocks, torch.ones_like(blocks, dtype=torch.int32))

    def mean(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.sum[blocks] / self.count[blocks].clamp(min=1)[:, None, None]


class RequestStates:
    """Per-request, per-layer state: ``get(request_id, layer)`` returns a dict that lives until the
    request finishes or is preempted (``drop``)."""

    def __init__(self) -> None:
        self._by_request: dict[str, dict[int, dict[str, Any]]] = {}
        #: Event counts selectors keep for the process (e.g. selection-cache lookups and hits).
        self.counters: dict[str, int] = {}

    def get(self, request_id: str, layer: int) -> dict[str, Any]:
        return self._by_request.setdefault(request_id, {}).setdefault(layer, {})

    def drop(self, request_ids: Iterable[str]) -> int:
        """Forget these requests; returns how many had state."""
        return sum(self._by_request.pop(r, None) is not None for r in request_ids)

    def live(self) -> int:
        return len(self._by_request)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_request
