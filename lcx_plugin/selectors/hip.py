"""``hip``: hierarchical top-k page pruning for prefill and decode (HiP).

HiP (Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention", https://arxiv.org/abs/2406.09827), built here from the paper's
idea on lcx's own parts:

- **Mask search** (``kernels/paged/hip_search.py``): for every block of ``query_block`` prompt
  rows (prefill) or every decode query, a tree search over the cache's pages finds ``k`` pages
  worth attending to in ``O(log T)`` rounds of ``2k`` page scores each, so a whole prefill costs
  ``O(T log T)``. Pages are scored by the per-page key bounds the layer keeps with the cache
  (``PageSummaries``); no key is read by the search.
- **Attention**: block-sparse, through the shared kernel family. Prefill rows of one query block
  see the sinks, their own recent window (exact per row) and the block's ``k`` pages; a decode
  query sees the sink pages, its window's pages and its ``k`` pages, as page lists only, which
  vLLM's own paged op runs from rewritten block tables on the CPU build.
- **Decode refresh**: a request's decode pages are searched again every ``refresh_every`` steps
  and reused in between; pages that slide out of the window meanwhile stay selected until the
  next search. The state lives in the engine's per-request homes and is dropped when the request
  finishes or is preempted, so it never crosses requests.
- ``dense_layers`` stay dense (the first layers' attention is broad in most models), and so does
  every context the selection would keep whole anyway (sinks + window + budget cover it), or one
  shorter than ``min_context``.
- With ``extrapolate`` the search is **position-neutral**: the layer keeps its page summaries from
  keys turned back to position 0 (``LayerCore.write`` with positions) and the search turns each
  query back from its own position, so a page's bound does not carry a query-key distance the
  model never saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lcx_plugin.head_patterns import ModelShape
from lcx_plugin.kernels.paged import BatchPlan, Selection
from lcx_plugin.kernels.paged.hip_search import centre_radius, search_pages
from lcx_plugin.kernels.paged.selection import QUERY_TILE, lists_from_mask

from . import register
from .base import SelectContext, TopKSelector, require


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@register
@dataclass(frozen=True)
class HiP(TopKSelector):
    """Hierarchical top-k page pruning (HiP) for prefill and decode.

    budget: tokens kept beyond sinks and window per query block and KV head, rounded up to whole
        pages (the search's ``k``): a count (int >= 1; the paper's fixed ``k``, which keeps the
        cost ``O(T log T)``) or a fraction of the context (float in (0, 1]).
    query_block: prompt rows that share one page search in prefill (a multiple of 16).
    refresh_every: decode steps a request's pages are reused before they are searched again
        (1: every step).
    dense_layers: layer indices that stay dense (none with ``extrapolate``).
    sink, window, min_context, extrapolate: as for every windowed method.
    """

    name: ClassVar[str] = "hip"
    no_extrapolation: ClassVar[str | None] = None  # a search per query block in prefill, per request in decode
    short_context_example: ClassVar[dict] = {"sink": 16, "window": 128, "budget": 256, "dense_layers": [0]}
    selection_follows_chunks: ClassVar[bool] = True
    needs_page_summaries: ClassVar[bool] = True
    needs_request_state: ClassVar[bool] = True

    sink: int = 64
    window: int = 512
    budget: int | float = 1024
    query_block: int = 64
    refresh_every: int = 8
    dense_layers: list | tuple = (0, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.query_block, int) and not isinstance(self.query_block, bool)
                and self.query_block >= QUERY_TILE and self.query_block % QUERY_TILE == 0,
                f"lcx config: query_block={self.query_block!r} must be a positive multiple of {QUERY_TILE}")
        require(isinstance(self.refresh_every, int) and not isinstance(self.refresh_every, bool)
                and self.refresh_every >= 1, f"lcx config: refresh_every={self.refresh_every!r} must be an int >= 1")
        layers = self.dense_layers
        require(isinstance(layers, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                          for x in layers),
                f"lcx config: dense_layers={layers!r} must be a list of layer indices (ints >= 0)")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
        require(not (self.extrapolate and self.dense_layers),
                f"lcx config: hip with extrapolate needs dense_layers [] (got {list(self.dense_layers)}): a dense "
                "layer attends at absolute positions, past the trained length too")

    def check_model(self, model: ModelShape) -> list[str]:
        bad = [x for x in self.dense_layers if x >= model.num_layers]
        return [f"lcx config: dense_layers {bad} do not exist in a model of {model.num_layers} layers"] if bad else []

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["dense_layers"] = list(self.dense_layers)
        return out

    # -- which sequences need a selection -------------------------------------------------------
    def dense_rows(self, plan: BatchPlan) -> list[bool]:
        return [s < self.min_context or s <= self.sink + self.window + self.budget_for(s) for s in plan.lens]

    def longest_attended(self, seq_len: int, block_size: int) -> int:
        return min(seq_len, self.sink + self.window + self.pages_for(seq_len, block_size) * block_size + block_size)

    def pages_for(self, seq_len: int, block_size: int) -> int:
        """The search's ``k``: the budget in whole pages."""
        return max(1, _cdiv(self.budget_for(seq_len), block_size))

    # -- selection ------------------------------------------------------------------------------
    def select(self, ctx: SelectContext) -> Selection | None:
        if ctx.layer in self.dense_layers:
            return None
        plan, kv = ctx.plan, ctx.kv
        bs, hkv, hq = kv.block_size, ctx.num_kv_heads, ctx.num_heads
        group = hq // hkv
        counters = ctx.requests.counters
        lo = _cdiv(self.sink, bs)
        prefill = plan.max_query_len > 1
        lists: list[torch.Tensor] = []  # per sequence [Hkv, NQB_b, W_b] pages, ascending
        counts: list[torch.Tensor] = []  # per sequence [Hkv, NQB_b]
        sink = torch.zeros(plan.num_seqs, hkv, dtype=torch.int32)
        window = torch.zeros(plan.num_seqs, hkv, dtype=torch.int32)
        for b in range(plan.num_seqs):
            s, qlen, start = plan.lens[b], plan.q_len(b), plan.starts[b]
            n_pages = _cdiv(s, bs)
            blocks = plan.block_table[b, :n_pages].long().to(ctx.pages.min.device)
            centre, radius = centre_radius(ctx.pages.min[blocks], ctx.pages.max[blocks])
            k = self.pages_for(s, bs)
            q = ctx.query[start: start + qlen].float()  # [qlen, Hq, D]
            if self.extrapolate and ctx.rope is not None:  # position-neutral: the summaries hold un-rotated keys
                q = ctx.rope.rotate(q, -torch.arange(s - qlen, s, device=q.device)[:, None])
            if qlen > 1:
                idx, cnt = self._prefill(q, centre, radius, lo, s, bs, k, group)
                sink[b], window[b] = self.sink, self.window
            else:
                idx, cnt = self._decode(q, centre, radius, lo, s, bs, k, group,
                                        ctx.requests.get(ctx.request_ids[b], ctx.layer), counters)
            lists.append(idx)
            counts.append(cnt)
        nqb = max(c.shape[1] for c in counts)
        width = max(1, max(i.shape[2] for i in lists))
        indices = torch.zeros(plan.num_seqs, hkv, nqb, width, dtype=torch.int32)
        cnts = torch.zeros(plan.num_seqs, hkv, nqb, dtype=torch.int32)
        for b, (i, c) in enumerate(zip(lists, counts)):
            indices[b, :, : i.shape[1], : i.shape[2]] = i
            cnts[b, :, : c.shape[1]] = c
        return Selection.build(plan.num_seqs, hkv, granularity="page", indices=indices, counts=cnts, sink=sink,
                               window=window, query_block=self.query_block if prefill else 0,
                               device=ctx.query.device)

    def _prefill(self, q: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, lo: int, seq_len: int, bs: int,
                 k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages per query block of a prompt chunk ``q`` ``[qlen, Hq, D]`` (its last row at
        ``seq_len - 1``): each block chooses among the pages wholly before its first row's window."""
        qlen, hq, d = q.shape
        qb = self.query_block
        nqb = _cdiv(qlen, qb)
        pad = nqb * qb - qlen
        if pad:
            q = torch.cat([q, q[-1:].expand(pad, hq, d)])
        rows = q.view(nqb, qb, hq // group, group, d).permute(0, 2, 3, 1, 4).reshape(nqb, hq // group, group * qb, d)
        first = seq_len - qlen + torch.arange(nqb) * qb  # position of each block's first row
        hi = ((first - self.window + 1 + bs - 1).clamp(min=0) // bs).clamp(min=lo)
        pages, cnt = search_pages(rows, centre, radius, lo, hi, k)
        return pages.transpose(0, 1), cnt.transpose(0, 1)

    def _decode(self, q: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, lo: int, seq_len: int, bs: int,
                k: int, group: int, state: dict, counters: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode query's page list ``[Hkv, 1, W]``: sink pages, the searched (or reused)
        pages and its window's pages, so the selection is page lists only."""
        hkv = q.shape[1] // group
        n_pages = _cdiv(seq_len, bs)
        hi = max(lo, min(n_pages, max(0, seq_len - self.window) // bs))  # pages >= hi hold the window
        fresh = state.get("k") != k or state.get("age", self.refresh_every) >= self.refresh_every \
            or state.get("hi", n_pages + 1) > hi
        if fresh:
            rows = q.view(1, hkv, group, q.shape[-1])
            pages, cnt = search_pages(rows, centre, radius, lo, torch.tensor([hi]), k)
            state.update(pages=pages[0].clone(), counts=cnt[0].clone(), hi=hi, age=1, k=k)
            counters["hip_searches"] = counters.get("hip_searches", 0) + 1
        else:
            state["age"] += 1
            counters["hip_reuses"] = counters.get("hip_reuses", 0) + 1
        keep = torch.zeros(hkv, n_pages, dtype=torch.bool)
        keep[:, : min(lo, n_pages)] = True
        # Pages that left the window since the search stay until the next one: nothing the last
        # steps saw is dropped between searches.
        keep[:, min(state["hi"], hi):] = True
        chosen, live = state["pages"].long(), torch.arange(state["pages"].shape[1])[None, :] < state["counts"][:, None]
        heads = torch.arange(hkv)[:, None].expand_as(chosen)
        keep[heads[live], chosen[live]] = True
        idx, cnt = lists_from_mask(keep)
        counters["hip_pages_attended"] = counters.get("hip_pages_attended", 0) + int(cnt.sum())
        counters["hip_pages_held"] = counters.get("hip_pages_held", 0) + n_pages * hkv
        return idx[:, None, :], cnt[:, None]
