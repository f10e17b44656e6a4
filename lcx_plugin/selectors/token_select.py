"""``token_select``: per-head q·k criticality, soft voting across a KV group's query heads, top-k,
and a selection cache that reuses a request's last selection while its query stays similar.

TokenSelect (Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation
for LLMs via Dynamic Token-Level KV Cache Selection", https://arxiv.org/abs/2411.02886). At each
decode step, for each sequence and layer:

1. **Score.** Every cached token gets ``scale * q·k`` per query head (the scoring kernels in
   ``kernels/paged/scoring.py`` read the paged cache in place, chunk by chunk; no dense copy).
   With ``granularity="page"`` the units are the cache's pages instead, scored by the Quest bound
   ``sum_d max(q_d min_d, q_d max_d)`` over the per-page key minima and maxima the layer keeps
   (``PageSummaries``), which reads two vectors per page instead of every key.
2. **Soft vote.** A softmax per query head over all units, summed over the query heads that share
   a KV head: each query head votes with a unit budget, so one head with sharp logits cannot
   drown the others.
3. **Top-k.** The ``budget`` best units outside the sinks and the recent window, per KV head
   (ties go to the earlier unit). Sinks and window are always kept.
4. **Cache.** The chosen units are kept per (request, layer, KV head) with the query heads that
   chose them. The next step reuses a KV head's units while the cosine similarity of its query
   heads (flattened) to those stays at or above ``reuse_similarity``; a request is scored again
   only when one of its heads moved, and only the heads that moved take the new units. Deciding
   per KV head keeps the result the same however the heads are split over tensor-parallel ranks. The state lives in the engine's per-request homes,
   dropped when a request finishes or is preempted, so it never crosses requests.

**Prefill** stays dense by default (``prefill="dense"``), as in the paper's decode-time method:
a prompt chunk costs what dense attention costs, quadratic in the prompt. With ``prefill="select"``
each block of ``query_block`` prompt rows selects too: the block's mean query is scored against
every token wholly before its first row's window (one scoring row per block, so a whole prefill
scores ``T^2 / query_block`` pairs instead of attending ``T^2 / 2``), soft-voted and cut to the
budget like a decode step; each row then attends to the sinks, its own window and its block's
units. A block's units depend on where the scheduler cut the chunks (the blocks tile each chunk).
This is what lets TokenSelect read prompts past the model's trained length: with
``extrapolate`` (which needs ``prefill="select"`` and token granularity) every row is read at
compacted positions, and scoring is **position-neutral**: cached keys are turned back from their
positions and queries from theirs before the product, so a query 30k tokens past a key scores it
as it would at distance 0 (``scoring.token_logits(rope=...)``), where the rotated product would
put a distance the model never saw into every score.

Contexts where the budget covers every unit anyway, or shorter than ``min_context``, stay dense,
on the engine's own kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lcx_plugin.kernels.paged import BatchPlan, Selection
from lcx_plugin.kernels.paged.scoring import page_logits, token_logits
from lcx_plugin.kernels.paged.selection import QUERY_TILE

from . import register
from .base import SelectContext, TopKSelector, require

GRANULARITIES = ("token", "page")
PREFILLS = ("dense", "select")
#: Scoring rows x context positions per chunk of prefill blocks scored at once (64 MiB of logits).
PREFILL_LOGIT_ELEMS = 1 << 24


def soft_vote(logits: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``logits`` ``[B, Hq, N]`` (``-inf``: no such unit) -> votes ``[B, Hkv, N]``: a softmax per
    query head, summed over each KV head's group of query heads."""
    b, hq, n = logits.shape
    probs = torch.softmax(logits.float(), dim=-1).nan_to_num_(0.0)
    return probs.view(b, num_kv_heads, hq // num_kv_heads, n).sum(2)


def top_units(votes: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k[b]`` best eligible units of every (sequence b, KV head), ascending.

    votes ``[B, Hkv, N]`` (not NaN), eligible ``[B, N]`` bool, k ``[B]`` int. Ties go to the lower
    unit, so the set is deterministic. Returns ``indices [B, Hkv, K]`` int32 (K = max k; entries
    past the count hold N) and ``counts [B, Hkv]`` int32.

    Each vote becomes a unique 64-bit key, its float order in the high half and the reversed unit
    number in the low half, so one partial selection (``topk``) of the keys is the exact set: no
    sort of all N, and no pass over the units tied with the k-th."""
    b, h, n = votes.shape
    kmax = min(int(k.max()) if k.numel() else 0, n)
    if kmax == 0:
        return torch.full((b, h, 0), n, dtype=torch.int32), torch.zeros(b, h, dtype=torch.int32)
    key = _order_high(votes) | (n - 1 - torch.arange(n, device=votes.device))  # equal votes: the lower unit wins
    key.masked_fill_(~eligible[:, None, :], torch.iinfo(torch.int64).min)
    best = torch.topk(key, kmax, dim=-1, sorted=True).indices  # [B, Hkv, kmax], best first
    counts = torch.minimum(k.clamp(min=0), eligible.sum(-1)).to(torch.int32)[:, None].expand(b, h)
    live = torch.arange(kmax, device=votes.device)[None, None, :] < counts[..., None]
    idx = torch.where(live, best, n).sort(-1).values
    return idx.to(torch.int32), counts.contiguous()


def _order_high(votes: torch.Tensor) -> torch.Tensor:
    """Each vote's float order as an int64 in the high 32 bits (the low half is free for a tie-break)."""
    bits = (votes.float() + 0.0).view(torch.int32)  # + 0.0: a -0.0 vote ties with +0.0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long() << 32  # the floats' order, as integers


def _count_lookups(ctx: SelectContext, requests: int) -> None:
    """One selection-cache lookup per (request, KV head), whether or not a cache is kept."""
    counters = ctx.requests.counters
    counters["selection_lookups"] = counters.get("selection_lookups", 0) + requests * ctx.num_kv_heads


@register
@dataclass(frozen=True)
class TokenSelect(TopKSelector):
    """Top-k tokens (or pages) per KV head by soft-voted q·k criticality, with a selection cache.

    budget: tokens kept beyond sinks and window, per KV head: a count (int >= 1) or a fraction of
        the context (float in (0, 1]). With ``granularity="page"`` it is rounded up to whole pages.
    granularity: "token" (score every cached key) or "page" (score per-page key bounds).
    reuse_similarity: reuse a request's previous selection while the cosine similarity of its new
        query to the one that chose it is at least this (per layer); null: score every step.
    prefill: "dense" (the paper's; every prompt row attends to its whole context) or "select"
        (each block of ``query_block`` prompt rows selects from its mean query).
    query_block: prompt rows that share one selection with ``prefill="select"`` (a multiple of 16).
    sink, window, min_context: as for every windowed method.
    extrapolate: compacted positions and position-neutral scoring; needs ``prefill="select"``
        and ``granularity="token"``.
    """

    name: ClassVar[str] = "token_select"
    no_extrapolation: ClassVar[str | None] = None  # with prefill "select" (checked in __post_init__)
    short_context_example: ClassVar[dict] = {"sink": 16, "window": 128, "budget": 128}
    needs_request_state: ClassVar[bool] = True
    # With prefill "select" a prompt block's tokens do follow the scheduler's chunks (as HiP's);
    # the class-level flag describes the example above, which prefills dense (the reliability
    # matrix runs it; prefill "select" is checked against its statement and fuzzed instead).
    selection_follows_chunks: ClassVar[bool] = False

    sink: int = 64
    window: int = 256
    budget: int | float = 0.125
    granularity: str = "token"
    reuse_similarity: float | None = 0.9
    prefill: str = "dense"
    query_block: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.granularity in GRANULARITIES,
                f"lcx config: granularity={self.granularity!r} must be one of {list(GRANULARITIES)}")
        if self.reuse_similarity is not None:
            require(-1.0 <= self.reuse_similarity <= 1.0,
                    f"lcx config: reuse_similarity={self.reuse_similarity} must be in [-1, 1] (a cosine), or null")
        require(self.prefill in PREFILLS, f"lcx config: prefill={self.prefill!r} must be one of {list(PREFILLS)}")
        require(self.query_block >= QUERY_TILE and self.query_block % QUERY_TILE == 0,
                f"lcx config: query_block={self.query_block!r} must be a positive multiple of {QUERY_TILE}")
        require(not self.extrapolate or self.prefill == "select",
                "lcx config: token_select extrapolates only with prefill 'select': a dense prefill would read a "
                "prompt past the trained length at positions the model never saw")
        require(not self.extrapolate or self.granularity == "token",
                "lcx config: token_select extrapolates with granularity 'token' only: page summaries hold keys "
                "rotated at their positions, which cannot be scored position-neutrally")

    @property
    def needs_page_summaries(self) -> bool:  # type: ignore[override]
        return self.granularity == "page"

    # -- which sequences need a selection -------------------------------------------------------
    def dense_rows(self, plan: BatchPlan) -> list[bool]:
        # Prefill rows are dense unless prefill="select" (see the module docstring); so is a
        # context the selection would keep whole: sinks + window + budget cover it.
        return [(plan.q_len(b) != 1 and self.prefill == "dense") or s < self.min_context
                or s <= self.sink + self.window + self.budget_for(s) for b, s in enumerate(plan.lens)]

    def longest_attended(self, seq_len: int, block_size: int) -> int:
        # A prompt row also sees its block's units between its first row's window and its own.
        extra = self.query_block if self.prefill == "select" else 0
        return min(seq_len, super().longest_attended(seq_len, block_size) + extra)

    def dense_reason(self, q_len: int, seq_len: int) -> str:
        return "prefill" if q_len != 1 and self.prefill == "dense" else "short_context"

    # -- selection ------------------------------------------------------------------------------
    def select(self, ctx: SelectContext) -> Selection:
        plan = ctx.plan
        decode = [plan.q_len(b) == 1 for b in range(plan.num_seqs)]
        if all(decode):
            return self._decode_selection(ctx)
        if self.prefill != "select":
            raise ValueError("token_select prefills dense unless prefill='select'; prefill rows must be planned dense")
        return self._prefill_selection(ctx, decode)

    def _prefill_selection(self, ctx: SelectContext, decode: list[bool]) -> Selection:
        """A step with prompt chunks: per sequence ``[Hkv, NQB, W]`` units (decode rows: their
        decode selection as block 0), sinks and windows, one query block size for all."""
        plan, hkv, bs = ctx.plan, ctx.num_kv_heads, ctx.kv.block_size
        lists: list[tuple[torch.Tensor, torch.Tensor]] = [None] * plan.num_seqs  # type: ignore[list-item]
        sink = torch.full((plan.num_seqs, hkv), self.sink, dtype=torch.int32)
        window = torch.full((plan.num_seqs, hkv), self.window, dtype=torch.int32)
        if any(decode):
            sub = dataclasses.replace(ctx, query=ctx.query.index_select(0, plan.token_rows(decode).to(ctx.query.device)),
                                      plan=plan.subset(decode),
                                      request_ids=tuple(r for r, d in zip(ctx.request_ids, decode) if d))
            chosen = self._decode_selection(sub)
            for j, b in enumerate(i for i, d in enumerate(decode) if d):
                lists[b] = (chosen.indices[j, :, :1].cpu(), chosen.counts[j, :, :1].cpu())
                sink[b], window[b] = chosen.sink[j].cpu(), chosen.window[j].cpu()
        for b in (i for i, d in enumerate(decode) if not d):
            lists[b] = self._block_units(ctx, b)
        nqb = max(c.shape[1] for _, c in lists)
        width = max(1, max(i.shape[2] for i, _ in lists))
        indices = torch.zeros(plan.num_seqs, hkv, nqb, width, dtype=torch.int32)
        counts = torch.zeros(plan.num_seqs, hkv, nqb, dtype=torch.int32)
        for b, (i, c) in enumerate(lists):
            indices[b, :, : i.shape[1], : i.shape[2]], counts[b, :, : c.shape[1]] = i, c
        c = ctx.requests.counters
        c["prefill_blocks_selected"] = c.get("prefill_blocks_selected", 0) + sum(
            -(-plan.q_len(b) // self.query_block) for b, d in enumerate(decode) if not d)
        return Selection.build(plan.num_seqs, hkv, granularity=self.granularity, indices=indices, counts=counts,
                               sink=sink, window=window, query_block=self.query_block, device=ctx.query.device)

    def _block_units(self, ctx: SelectContext, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The units of each query block of sequence ``b``'s prompt chunk: ``[Hkv, NQB, K]`` and
        counts ``[Hkv, NQB]``. A block scores with its rows' mean query (position-neutral under
        ``extrapolate``) everything up to its first row; the eligible units lie wholly before that
        row's window and past the sinks, as for a decode query at that row."""
        plan, kv, hkv = ctx.plan, ctx.kv, ctx.num_kv_heads
        bs, qb = kv.block_size, self.query_block
        seq_len, qlen, start = plan.lens[b], plan.q_len(b), plan.starts[b]
        q = ctx.query[start: start + qlen].float()  # [qlen, Hq, D]
        rope = ctx.rope if self.extrapolate else None
        first_pos = seq_len - qlen
        if rope is not None:  # every row back to position 0 before the rows are averaged
            q = rope.rotate(q, -torch.arange(first_pos, seq_len, device=q.device)[:, None])
        nqb = -(-qlen // qb)
        means = torch.stack([q[i * qb: (i + 1) * qb].mean(0) for i in range(nqb)])  # [NQB, Hq, D]
        ends = [first_pos + i * qb + 1 for i in range(nqb)]  # each block scores positions < its first row + 1
        table = plan.block_table[b: b + 1]
        idx_parts, cnt_parts = [], []
        per_chunk = max(1, PREFILL_LOGIT_ELEMS // max(1, means.shape[1] * max(ends)))
        for c0 in range(0, nqb, per_chunk):
            c1 = min(nqb, c0 + per_chunk)
            lens = ends[c0:c1]
            sub = BatchPlan.from_lists([1] * (c1 - c0), lens, table.expand(c1 - c0, -1))
            idx, cnt = self._units(means[c0:c1], ctx, sub, rope)
            idx_parts.append(idx)
            cnt_parts.append(cnt)
        width = max(i.shape[-1] for i in idx_parts)
        idx = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[-1])) for i in idx_parts])  # [NQB, Hkv, K]
        cnt = torch.cat(cnt_parts)
        idx, cnt = self._with_gap(idx, cnt, first_pos, qlen, bs)
        return idx.transpose(0, 1), cnt.transpose(0, 1)

    def _with_gap(self, idx: torch.Tensor, cnt: torch.Tensor, first_pos: int, qlen: int, bs: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append to each block's units the ones between its first row's window and its last
        row's: a later row of the block then still sees every token back to the first row's
        window start, so no row sees less than its window, and a budget that covers every
        eligible unit is dense. They lie past every scored unit, so the lists stay ascending."""
        qb = self.query_block
        nqb, hkv, width = idx.shape
        first = first_pos + torch.arange(nqb) * qb
        last = torch.clamp(first + qb - 1, max=first_pos + qlen - 1)
        if self.granularity == "token":
            lo = torch.clamp(first - self.window + 1, min=self.sink)
            hi = last - self.window + 1  # exclusive
        else:
            lo = torch.clamp((first - self.window + 1).clamp(min=0) // bs, min=-(-self.sink // bs))
            hi = -(-(last - self.window + 1).clamp(min=0) // bs)
        n = (hi - lo).clamp(min=0)
        g = int(n.max()) if nqb else 0
        if g == 0:
            return idx, cnt
        past = torch.iinfo(torch.int32).max  # dead entries sort after every live one
        scored = torch.where(torch.arange(width)[None, None, :] < cnt[..., None].long(), idx.long(), past)
        gap = torch.where(torch.arange(g)[None, :] < n[:, None], lo[:, None] + torch.arange(g), past)
        out = torch.cat([scored, gap[:, None, :].expand(nqb, hkv, g)], -1).sort(-1).values
        return out.clamp(max=past).to(idx.dtype), cnt + n[:, None].to(cnt.dtype)

    def _decode_selection(self, ctx: SelectContext) -> Selection:
        plan = ctx.plan
        query = ctx.query[: plan.num_seqs]  # one row per sequence
        bs = ctx.kv.block_size
        if self.granularity == "page" and self.reuse_similarity is None:
            _count_lookups(ctx, plan.num_seqs)
            selection = self._fresh_pages(query, ctx)
            self._count_bytes(ctx, [True] * plan.num_seqs, selection)
            return selection
        states = [ctx.requests.get(r, ctx.layer) for r in ctx.request_ids]
        reuse = self._reusable(query, states, ctx)  # [B, Hkv]
        fresh = [not bool(r.all()) for r in reuse]
        stacked = None
        if any(fresh):
            idx, cnt = self._score(query, ctx, fresh)
            if self.reuse_similarity is None:  # no cache: nothing to keep for the next step
                stacked = (idx.long(), cnt.long())
            elif not bool(reuse.any()):  # every head of every request takes its new units
                stacked = (idx.long(), cnt.long())
                q32 = query.to(torch.float32, copy=True)  # kept: the engine reuses its query buffer
                for b, state in enumerate(states):
                    state.update(query=q32[b], indices=idx[b], counts=cnt[b], granularity=self.granularity)
            else:
                q32 = query.to(torch.float32, copy=True)
                self._merge(states, reuse, fresh, q32, idx, cnt, q32.shape[1] // ctx.num_kv_heads)
        selection = self._selection(stacked or _stacked(states), plan, ctx.num_kv_heads, bs, query.device)
        self._count_bytes(ctx, fresh, selection)
        return selection

    def _fresh_pages(self, query: torch.Tensor, ctx: SelectContext) -> Selection:
        """A decode step scored afresh at page granularity (no selection cache): the same pages as
        ``_score`` then ``_selection`` choose, in a dozen tensor ops. Everything that depends on
        the batch alone comes from the step's ``_PageLayout``, built by its first layer."""
        plan, hkv, bs = ctx.plan, ctx.num_kv_heads, ctx.kv.block_size
        layout = self._page_layout(plan, bs)
        logits = page_logits(query, ctx.pages.min, ctx.pages.max, plan, bs, ctx.softmax_scale)
        votes = soft_vote(logits, hkv).cpu()  # [B, Hkv, N]
        b = votes.shape[0]
        if layout.kmax == 0:
            indices = layout.base.expand(b, hkv, -1)
        else:
            key = _order_high(votes) + layout.key_low  # as top_units keys them (ineligible: negative)
            best = torch.topk(key, layout.kmax, dim=-1).indices  # best first: a shorter budget keeps a prefix
            chosen = torch.where(layout.live, best, votes.shape[-1]).sort(-1).values  # ascending, padded
            indices = torch.where(layout.middle, chosen.gather(-1, layout.source.expand(b, hkv, -1)), layout.base)
        return Selection.build(b, hkv, granularity="page", indices=indices,
                               counts=layout.counts[:, None].expand(b, hkv), device=query.device)

    def _merge(self, states: list[dict], reuse: torch.Tensor, fresh: list[bool], q32: torch.Tensor,
               idx: torch.Tensor, cnt: torch.Tensor, group: int) -> None:
        """Store the fresh rows' new units (``idx``/``cnt`` hold the fresh rows only); heads that
        did not move keep their units and the query that chose them."""
        for j, b in enumerate(i for i, f in enumerate(fresh) if f):
            new_q, new_idx, new_cnt = q32[b], idx[j], cnt[j]
            kept = reuse[b]
            if bool(kept.any()):
                old = states[b]
                width = max(new_idx.shape[-1], old["indices"].shape[-1])
                new_idx = torch.where(kept[:, None], _pad(old["indices"], width), _pad(new_idx, width))
                new_cnt = torch.where(kept, old["counts"], new_cnt)
                new_q = torch.where(kept.repeat_interleave(group)[:, None].to(new_q.device), old["query"], new_q)
            states[b].update(query=new_q, indices=new_idx, counts=new_cnt, granularity=self.granularity)

    def _count_bytes(self, ctx: SelectContext, fresh: list[bool], selection: Selection) -> None:
        """KV bytes this step reads for the selected sequences, from the real selections: the
        scoring pass (keys, or float32 page minima and maxima; none on a cache hit) plus the
        attention over what was selected; and what dense attention would have read."""
        kv, plan, c = ctx.kv, ctx.plan, ctx.requests.counters
        side = kv.side_bytes  # one token of one head, keys or values
        hkv, d, bs = kv.num_kv_heads, kv.head_dim, kv.block_size
        dense = sum(plan.lens) * hkv * 2 * side
        if self.granularity == "token":
            lens = torch.tensor(plan.lens)
            scoring = sum(n for n, f in zip(plan.lens, fresh) if f) * hkv * side
            counts = selection.counts[:, :, 0].long()  # [B, Hkv]
            width = selection.indices.shape[-1]
            live = torch.arange(width)[None, None, :] < counts[..., None]
            listed = (live & (selection.indices[:, :, 0].long() < (lens - self.window)[:, None, None])).sum(-1)
            sinks = lens.clamp(max=self.sink)
            window = (lens - sinks).clamp(max=self.window)
            read = int((listed + (sinks + window)[:, None]).sum()) * 2 * side
        else:
            scoring = sum(-(-n // bs) for n, f in zip(plan.lens, fresh) if f) * hkv * d * 2 * 4
            read = int(selection.counts.sum()) * bs * 2 * side
        for key, value in (("kv_bytes_dense", dense), ("kv_bytes_scoring", scoring), ("kv_bytes_attention", read)):
            c[key] = c.get(key, 0) + value

    def _reusable(self, query: torch.Tensor, states: list[dict], ctx: SelectContext) -> torch.Tensor:
        """``[B, Hkv]`` bool: which (request, KV head) reuse their units. One lookup per request and
        KV head; a hit per head reused."""
        hkv = ctx.num_kv_heads
        counters = ctx.requests.counters
        _count_lookups(ctx, len(states))
        out = torch.zeros(len(states), hkv, dtype=torch.bool)
        if self.reuse_similarity is None:
            return out
        rows = [b for b, s in enumerate(states) if s.get("granularity") == self.granularity]
        if not rows:
            return out
        prev = torch.stack([states[b]["query"] for b in rows]).reshape(len(rows), hkv, -1)
        now = query[rows].float().reshape(len(rows), hkv, -1)
        out[rows] = (torch.nn.functional.cosine_similarity(now, prev, dim=2) >= self.reuse_similarity).cpu()
        counters["selection_hits"] = counters.get("selection_hits", 0) + int(out.sum())
        return out

    def _score(self, query: torch.Tensor, ctx: SelectContext, fresh: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh top-k units (excluding sinks and window) for the sequences where ``fresh``."""
        plan = ctx.plan if all(fresh) else ctx.plan.subset(fresh)
        q = query if all(fresh) else query[torch.tensor(fresh, device=query.device)]
        rope = ctx.rope if self.extrapolate else None
        if rope is not None:  # the query back to position 0 (keys follow in token_logits)
            q = rope.rotate(q.float(), -(torch.tensor(plan.lens, device=q.device) - 1)[:, None])
        return self._units(q, ctx, plan, rope)

    def _units(self, q: torch.Tensor, ctx: SelectContext, plan: BatchPlan, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k units of one scoring row per sequence of ``plan`` (the row at position
        ``lens - 1``): ``[B, Hkv, K]`` and counts ``[B, Hkv]``. ``rope``: ``q`` is un-rotated and
        the keys are turned back to position 0 as they are read."""
        bs = ctx.kv.block_size
        scale = ctx.softmax_scale
        if self.granularity == "token":
            logits = token_logits(q, ctx.kv, plan, scale, rope=rope)
            n = logits.shape[-1]
            unit = torch.arange(n)
            lens = torch.tensor(plan.lens)
            eligible = (unit[None, :] >= self.sink) & (unit[None, :] <= lens[:, None] - 1 - self.window)
            k = torch.tensor([self.budget_for(s) for s in plan.lens])
        else:
            pages = ctx.pages
            logits = page_logits(q, pages.min, pages.max, plan, bs, scale)
            layout = self._page_layout(plan, bs)
            eligible, k = layout.eligible, layout.k
        votes = soft_vote(logits, ctx.num_kv_heads)
        return top_units(votes.cpu(), eligible, k)

    def _page_layout(self, plan: BatchPlan, bs: int) -> "_PageLayout":
        """The step's page bookkeeping (the same for every layer): built once per plan."""
        return plan.memo(("token_select.pages", bs, self.sink, self.window, self.budget),
                         lambda: _PageLayout.build(self, plan, bs))

    def _always_kept_pages(self, lens: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: pages ``< lo`` hold sink tokens and pages ``>= hi`` hold window tokens (of
        the query at position ``len - 1``)."""
        lo = torch.full_like(lens, -(-self.sink // bs))
        hi = (lens - self.window).clamp(min=0) // bs
        return lo, torch.maximum(hi, lo)

    def _selection(self, units: tuple[torch.Tensor, torch.Tensor], plan: BatchPlan, hkv: int, bs: int, device
                   ) -> Selection:
        """The step's selection from every request's units ``[B, Hkv, K]`` and counts ``[B, Hkv]``."""
        chosen, counts = units
        b = chosen.shape[0]
        if self.granularity == "token":
            idx, cnt = chosen, counts
            return Selection.build(b, hkv, granularity="token", indices=idx.to(torch.int32), counts=cnt.to(torch.int32), sink=self.sink,
                                   window=self.window, device=device)
        # Pages: the chosen ones plus the pages holding sinks and window, as one list per head, so
        # the selection is page lists only (what an engine's own paged op runs). The chosen pages
        # lie between the sink pages and the window's (eligible ones only), ascending, so each list
        # is the sink pages, the chosen ones still below the window (a page chosen earlier may
        # have entered it since), then the window's pages: a concatenation, no sort.
        layout = self._page_layout(plan, bs)
        n_pages, lo, hi = layout.n_pages, layout.lo, layout.hi
        k = chosen.shape[-1]
        lo3, hi3 = lo[:, None, None], hi[:, None, None]
        below = ((torch.arange(k)[None, None, :] < counts[..., None]) & (chosen < hi3)).sum(-1)  # [B, Hkv]
        cnt = lo[:, None] + below + (n_pages - hi)[:, None]
        pos = torch.arange(int(cnt.max()))[None, None, :]
        c3 = below[..., None]
        picked = chosen.gather(-1, (pos - lo3).clamp(0, k - 1).expand(b, hkv, -1)) if k else pos
        idx = torch.where(pos < lo3, pos, torch.where(pos < lo3 + c3, picked, hi3 + pos - lo3 - c3)).to(torch.int32)
        cnt = cnt.to(torch.int32)
        return Selection.build(b, hkv, granularity="page", indices=idx, counts=cnt, device=device)


@dataclass(frozen=True)
class _PageLayout:
    """A decode plan's page bookkeeping, per sequence (the same for every layer of a step).

    ``n_pages``; the sink pages ``[0, lo)`` and the window's ``[hi, n_pages)`` (always kept,
    clamped to the context); which pages top-k may pick (``eligible`` ``[B, N]``) and how many
    (``k``). For a step scored afresh (``TokenSelect._fresh_pages``): ``picked`` ``[B]`` pages it
    does pick, ``kmax`` their most; ``key_low`` ``[B, 1, N]`` int64, the low half of each page's
    top-k key (``N - 1 - page``, so that ties go to the lower page; ``INT64_MIN`` where not
    eligible); ``live`` ``[B, 1, kmax]`` which top-k slots count; and the page list's assembly,
    ``[B, 1, W]``: slot ``j`` holds ``base[j]`` (a sink or window page) or, where ``middle``,
    chosen page ``source[j]``; ``counts`` ``[B]`` the list's length."""

    n_pages: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    eligible: torch.Tensor
    k: torch.Tensor
    picked: torch.Tensor
    kmax: int
    key_low: torch.Tensor
    live: torch.Tensor
    base: torch.Tensor
    middle: torch.Tensor
    source: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def build(selector: TokenSelect, plan: BatchPlan, bs: int) -> "_PageLayout":
        lens = torch.tensor(plan.lens)
        n_pages = (lens + bs - 1) // bs
        kept_lo, kept_hi = selector._always_kept_pages(lens, bs)
        n = int(n_pages.max()) if len(plan.lens) else 0
        unit = torch.arange(n)
        eligible = (unit[None, :] >= kept_lo[:, None]) & (unit[None, :] < kept_hi[:, None]) & \
                   (unit[None, :] < n_pages[:, None])
        k = torch.tensor([-(-selector.budget_for(s) // bs) for s in plan.lens])
        lo = torch.minimum(kept_lo, n_pages)
        hi = torch.minimum(torch.maximum(kept_hi, lo), n_pages)
        picked = torch.minimum(k.clamp(min=0), eligible.sum(-1))
        kmax = min(int(k.max()) if k.numel() else 0, n)
        key_low = torch.where(eligible, n - 1 - unit, torch.iinfo(torch.int64).min)[:, None, :]
        live = (torch.arange(kmax)[None, :] < picked[:, None])[:, None, :]
        counts = lo + picked + (n_pages - hi)
        j = torch.arange(int(counts.max()) if counts.numel() else 0)[None, :]
        lo2, hi2, c2 = lo[:, None], hi[:, None], picked[:, None]
        base = torch.where(j < lo2, j, hi2 + j - lo2 - c2)
        middle = (j >= lo2) & (j < lo2 + c2)
        source = (j - lo2).clamp(0, max(kmax - 1, 0))
        return _PageLayout(n_pages, lo, hi, eligible, k, picked, kmax, key_low, live, base[:, None],
                           middle[:, None], source[:, None], counts)


def _stacked(states: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The requests' kept units as one ``[B, Hkv, K]`` int64 tensor (padded past each count) and
    their counts ``[B, Hkv]``."""
    width = max(int(s["indices"].shape[-1]) for s in states)
    idx = torch.stack([_pad(s["indices"], width) for s in states]).long()
    return idx, torch.stack([s["counts"] for s in states]).long()


def _pad(indices: torch.Tensor, width: int) -> torch.Tensor:
    """``[Hkv, w]`` -> ``[Hkv, width]`` (entries past a head's count are ignored)."""
    if indices.shape[-1] == width:
        return indices
    return torch.nn.functional.pad(indices, (0, width - indices.shape[-1]))
