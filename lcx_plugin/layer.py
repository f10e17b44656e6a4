"""The engine-neutral layer core: one object per attention layer, and the step plan they share.

An engine adapter does two things per step and nothing more:
1. ``plan_step(...)`` once per step (in its metadata builder): the batch as a ``BatchPlan``, the
   request ids, and which sequences the layer's selector leaves dense;
2. per layer, ``LayerCore.write(...)`` and ``LayerCore.run(...)``.

``run`` sends the dense sequences to a **dense kernel** the adapter may supply (vLLM's CPU op,
for speed and token identity with the stock backend; otherwise lcx's own kernel), asks the
selector for a selection over the rest, and runs lcx's kernel family on it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import torch

from lcx_plugin.config import LcxConfig
from lcx_plugin.kernels.paged import BatchPlan, KVFormat, Selection, paged_attention
from lcx_plugin.kernels.paged import cpu_op
from lcx_plugin.kernels.paged.api import triton_cannot_compact
from lcx_plugin.kernels.paged.mixed import observed_importance
from lcx_plugin.kernels.paged.rope import Rope
from lcx_plugin.kernels.paged.window import window_attention
from lcx_plugin.metrics import Metrics
from lcx_plugin.selectors import LayerInfo, SelectContext, Selector
from lcx_plugin.selectors.dense import Dense
from lcx_plugin.state import PageSummaries, RequestStates


class DenseKernel(Protocol):
    def __call__(self, query: torch.Tensor, out: torch.Tensor, plan: BatchPlan) -> None: ...


class PageListKernel(Protocol):
    """An engine op driven by rewritten block tables: decode steps whose selection is only page lists."""

    def __call__(self, query: torch.Tensor, out: torch.Tensor, plan: BatchPlan, selection: Selection) -> None: ...


@dataclass
class StepPlan:
    """One step's batch, split once into the sequences that stay dense and the ones a selector serves."""

    batch: BatchPlan
    request_ids: tuple[str, ...]
    dense_rows: list[bool]
    dense: BatchPlan | None = None  # the dense sequences' sub-plan (None if none; ``batch`` if all)
    sparse: BatchPlan | None = None  # the selected sequences' sub-plan
    dense_token_rows: torch.Tensor | None = None  # query rows of ``dense`` in the batch (None: a prefix view)
    sparse_token_rows: torch.Tensor | None = None
    sparse_request_ids: tuple[str, ...] = ()
    #: Shared by every layer of the step: selectors keep layer-independent work here (a window
    #: selection is the same for all layers, so it is built, and prepared by the kernel, once).
    scratch: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """Every query row's absolute position, built once per step for all layers' writes."""
        return self.batch.positions()


def plan_step(selector: Selector, batch: BatchPlan, request_ids: tuple[str, ...],
              dense_engine_data: Callable[[BatchPlan], object] | None = None) -> StepPlan:
    """Split ``batch`` by ``selector.dense_rows``. ``dense_engine_data(plan)``, if given, computes what the
    adapter's dense kernel needs for the dense sub-plan (once per step, not per layer)."""
    # A sequence with no query rows this step (an idle row of an SGLang extend batch) computes
    # nothing: planned dense, it is never handed to the selector.
    rows = [d or batch.q_len(b) == 0 for b, d in enumerate(selector.dense_rows(batch))]
    step = StepPlan(batch, request_ids, rows)
    if all(rows):
        step.dense = batch if dense_engine_data is None else _with_engine(batch, dense_engine_data)
        return step
    if any(rows):
        sub = batch.subset(rows)
        step.dense = sub if dense_engine_data is None else _with_engine(sub, dense_engine_data)
        step.dense_token_rows = batch.token_rows(rows)
    sparse_mask = [not r for r in rows]
    if all(sparse_mask):
        step.sparse = batch
    else:
        step.sparse = batch.subset(sparse_mask)
        step.sparse_token_rows = batch.token_rows(sparse_mask)
    step.sparse_request_ids = tuple(r for r, keep in zip(request_ids, sparse_mask) if keep)
    return step


def _with_engine(plan: BatchPlan, fn) -> BatchPlan:
    return BatchPlan(plan.query_start_loc, plan.seq_lens, plan.block_table, plan.starts, plan.lens, fn(plan))


class LayerCore:
    """One attention layer: its index, heads, selector and state; ``write`` and ``run``."""

    def __init__(self, index: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 config: LcxConfig, impl: str, requests: RequestStates | None = None,
                 info: LayerInfo | None = None, rope: Rope | None = None) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.config = config
        self.selector = config.selector
        self.impl = impl  # "torch" or "triton": lcx's kernel for selections (and dense, without a dense kernel)
        self.requests = requests if requests is not None else RequestStates()
        self.pages: PageSummaries | None = None
        self.info = info or LayerInfo.single(index, num_kv_heads, head_dim)
        self.layer_data = self.selector.prepare_layer(self.info)
        self.split: SplitStorage | None = None
        self._unpromoted: list[tuple] = []  # mixed pages written this step, not yet promoted
        self.metrics: Metrics | None = None  # the process's lcx metrics, when the adapter records them
        # The model's RoPE, when the selector extrapolates: selections are read at compacted positions.
        self.rope = rope if getattr(self.selector, "extrapolate", False) else None
        if getattr(self.selector, "extrapolate", False) and rope is None:
            raise ValueError(f"lcx: method {self.selector.name!r} extrapolates but the adapter gave no RoPE description")

    def store_apart(self) -> "SplitStorage":
        """For an adapter that keeps a head split's streaming heads in storage of their own (only
        sinks + window): from now on ``write_split``/``run_split`` serve this layer."""
        if self.split is None:
            self.split = SplitStorage(self)
        return self.split
    @property
    def summaries_need_positions(self) -> bool:
        """Whether ``write`` needs each key's position: with ``extrapolate`` the page summaries hold
        keys turned back to position 0, so that searches over them are position-neutral."""
        return self.selector.needs_page_summaries and self.rope is not None

    def write(self, kv: KVFormat, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
              engine_write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
              positions: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """Store this step's keys and values ``[T, Hkv, D]``: per-page summaries first (from the raw
        keys, whatever the storage packs; un-rotated from ``positions`` ``[T]`` when
        ``summaries_need_positions``), then the cache, through the engine's writer if given.
        ``rows``: quantized pages only, the same keys and values already encoded."""
        if self.selector.needs_page_summaries:
            if self.pages is None:
                self.pages = PageSummaries(kv.num_blocks, kv.num_kv_heads, kv.head_dim, kv.block_size, kv.device)
            summarised = key
            if self.summaries_need_positions:
                if positions is None:
                    raise ValueError(f"lcx: layer {self.index} summarises keys position-neutrally; the adapter must "
                                     "pass each key's position to write()")
                n = positions.shape[0]
                summarised = self.rope.rotate(key[:n].float(), -positions.to(key.device)[:, None])
            self.pages.update(summarised, slot_mapping)
        if engine_write is not None:
            engine_write(key, value, slot_mapping)
        elif rows is not None:
            kv.write(key, value, slot_mapping, rows=rows)
        else:
            kv.write(key, value, slot_mapping)
            self._hold_for_promotion(kv, key, value, slot_mapping)

    def _hold_for_promotion(self, kv: KVFormat, key, value, slot_mapping) -> None:
        """Mixed-precision pages: ``run`` gives this step's tokens their high-precision slots, once
        it has the queries that score them."""
        if getattr(kv, "mixed", False):
            # A write the engine never followed with a forward (a warm-up step) is stale: drop it.
            self._unpromoted = [e for e in self._unpromoted if e[0] is not kv] + [(kv, key, value, slot_mapping)]

    def _promote(self, query: torch.Tensor, plan: BatchPlan) -> None:
        n = plan.num_tokens
        for kv, key, value, slots in self._unpromoted:
            if key.shape[0] < n:
                raise RuntimeError(f"lcx: layer {self.index} wrote {key.shape[0]} tokens this step but attends "
                                   f"with {n} query rows; mixed pages need both from the same step")
            kv.promote(key[:n], value[:n], slots[:n], observed_importance(query[:n], key[:n], plan, self.scale))
        self._unpromoted = []

    def run(self, query: torch.Tensor, kv: KVFormat, step: StepPlan, out: torch.Tensor,
            dense_kernel: DenseKernel | None = None, page_kernel: PageListKernel | None = None,
            key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
        """Attention for the step's ``query`` rows ``[T, Hq, D]`` into ``out`` (same rows).

        ``dense_kernel`` serves the sequences that need no selection; ``page_kernel`` serves decode
        steps whose selection is page lists only (both: the engine's own op, where the adapter has
        one); lcx's kernel family serves the rest. ``key``/``value``: this step's own ``[T, Hkv,
        D]``, row-aligned with ``query`` (already written to ``kv``), where the adapter has them:
        decode steps of a sinks-and-window-only method then read only those (``_window_decode``)."""
        self._promote(query, step.batch)
        if step.dense is not None:
            self._dense(query, kv, step, out, dense_kernel)
        if step.sparse is not None and not self._window_decode(query, kv, step, out, key, value):
            self._sparse(query, kv, step, out, page_kernel)
        if self.metrics is not None:
            self.metrics.counters(self.requests.counters)
        return out

    def _dense(self, query, kv, step: StepPlan, out, dense_kernel) -> None:
        rows = step.dense_token_rows
        q = query[: step.dense.num_tokens] if rows is None else query.index_select(0, rows)
        o = out[: step.dense.num_tokens] if rows is None else torch.empty_like(q)
        if dense_kernel is not None:
            dense_kernel(q, o, step.dense)
        else:
            paged_attention(q, kv, step.dense, self.scale, o, impl=self.impl)
        if rows is not None:
            out.index_copy_(0, rows, o)
        if self.metrics is not None:
            self.metrics.attention(step.dense, self.num_kv_heads)

    def write_split(self, kv_retrieval: KVFormat, kv_streaming: KVFormat, key: torch.Tensor, value: torch.Tensor,
                    slots_retrieval: torch.Tensor, slots_streaming: torch.Tensor,
                    engine_write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Store the retrieval heads' keys/values like any layer, the streaming heads' at
        ``slots_streaming`` (negative: not kept, skipped)."""
        sp = self.split
        k_r, v_r = key.index_select(1, sp.r_kv), value.index_select(1, sp.r_kv)
        if engine_write is None and _one_quantized_format(kv_retrieval, kv_streaming) and not cpu_op.serves(
                kv_streaming, key):  # the native write quantizes each head where it lands: nothing to share
            rows = kv_streaming.encode_rows(key, value)  # every head quantized in one pass, then split
            sp.retrieval.write(kv_retrieval, k_r, v_r, slots_retrieval, rows=rows.index_select(1, sp.r_kv))
            kv_streaming.write(None, None, slots_streaming, rows=rows.index_select(1, sp.s_kv))
            return
        sp.retrieval.write(kv_retrieval, k_r, v_r, slots_retrieval, engine_write)
        k_s, v_s = key.index_select(1, sp.s_kv), value.index_select(1, sp.s_kv)
        kv_streaming.write(k_s, v_s, slots_streaming)
        self._hold_for_promotion(kv_streaming, k_s, v_s, slots_streaming)

    def run_split(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_retrieval: KVFormat,
                  kv_streaming: KVFormat, step: StepPlan, streaming_plan: BatchPlan, out: torch.Tensor,
                  dense_kernel: DenseKernel | None = None, page_kernel: PageListKernel | None = None) -> torch.Tensor:
        """Attention with the heads stored apart: retrieval heads over their full cache (through
        the inner method, ``step`` planned for it), streaming heads over sinks + window storage
        plus this step's own keys (``streaming_plan`` holds that storage's block table)."""
        sp = self.split
        q_r = query.index_select(1, sp.r_q)
        out_r = torch.empty_like(q_r)
        sp.retrieval.run(q_r, kv_retrieval, step, out_r, dense_kernel, page_kernel)
        q_s = query.index_select(1, sp.s_q)
        self._promote(q_s, step.batch)
        out_s = torch.empty_like(q_s)
        window_attention(q_s, kv_streaming, streaming_plan, self.scale, out_s, self.selector.sink, self.selector.window,
                         key.index_select(1, sp.s_kv), value.index_select(1, sp.s_kv))
        out.index_copy_(1, sp.r_q, out_r)
        out.index_copy_(1, sp.s_q, out_s)
        if self.metrics is not None:
            self.metrics.attention(step.batch, len(sp.s_kv), attended=self._window_attended(step.batch, len(sp.s_kv)))
        return out

    def _window_decode(self, query, kv, step: StepPlan, out, key, value) -> bool:
        """A decode-only step of a method that keeps sinks and a window alone (``window_only``: not
        extrapolating, on lcx's torch kernels), its own keys given: the sequences' rows attend in
        one gather and one SDPA call (``window._decode_rows``, as a head split's streaming heads
        do) instead of through a selection; a decode step 0.60x stock's speed before, at one
        request, 7k tokens. False: not served here."""
        plan = step.sparse
        if (key is None or value is None or self.rope is not None or self.impl != "torch"
                or plan.max_query_len != 1 or not self.selector.window_only):
            return False
        rows = step.sparse_token_rows
        n = plan.num_tokens
        q, k, v = ((x[:n] for x in (query, key, value)) if rows is None
                   else (x.index_select(0, rows) for x in (query, key, value)))
        o = out[:n] if rows is None else torch.empty_like(q)
        window_attention(q, kv, plan, self.scale, o, self.selector.sink, self.selector.window, k, v)
        if rows is not None:
            out.index_copy_(0, rows, o)
        if self.metrics is not None:
            self.metrics.attention(plan, self.num_kv_heads, attended=self._window_attended(plan, self.num_kv_heads))
        return True

    def _window_attended(self, plan: BatchPlan, heads: int) -> int:
        """Context tokens ``heads`` KV heads attend under sinks + window, for each sequence's newest query."""
        kept = self.selector.sink + self.selector.window
        return heads * sum(min(n, kept) for n in plan.lens)

    def _sparse(self, query, kv, step: StepPlan, out, page_kernel) -> None:
        rows = step.sparse_token_rows
        q = query[: step.sparse.num_tokens] if rows is None else query.index_select(0, rows)
        ctx = SelectContext(layer=self.index, query=q, kv=kv, plan=step.sparse, request_ids=step.sparse_request_ids,
                            num_heads=self.num_heads, pages=self.pages, requests=self.requests, step=step.scratch,
                            layer_data=self.layer_data, scale=self.scale, rope=self.rope)
        selection = self.selector.select(ctx)
        o = out[: step.sparse.num_tokens] if rows is None else torch.empty_like(q)
        if (page_kernel is not None and selection is not None and step.sparse.max_query_len == 1
                and selection.only_page_lists and self.rope is None):
            page_kernel(q, o, step.sparse, selection)
        else:
            impl = self.impl
            if self.rope is not None and selection is not None and triton_cannot_compact(kv, self.rope):
                impl = "torch"  # the twin reads every format at compacted positions
            paged_attention(q, kv, step.sparse, self.scale, o, selection, impl=impl, rope=self.rope)
        if rows is not None:
            out.index_copy_(0, rows, o)
        if self.metrics is not None:
            self.metrics.attention(step.sparse, self.num_kv_heads, selection, kv.block_size)


class SplitStorage:
    """A head split whose streaming heads live in storage of their own: the head indices of each
    side, and a layer core for the retrieval heads alone (with the split's inner method)."""

    def __init__(self, core: LayerCore) -> None:
        split = core.layer_data
        r, s = split.retrieval_heads, split.streaming_heads
        if not r or not s:
            raise ValueError(f"layer {core.index}: storing heads apart needs both kinds, got retrieval {r} streaming {s}")
        group = core.num_heads // core.num_kv_heads
        self.r_kv, self.s_kv = torch.tensor(r), torch.tensor(s)
        self.r_q = torch.tensor([h * group + j for h in r for j in range(group)])
        self.s_q = torch.tensor([h * group + j for h in s for j in range(group)])
        inner = core.selector.retrieval or Dense()
        info = core.info
        r_info = LayerInfo(info.index, len(r), info.head_dim, info.model, info.kv_head_offset)
        self.retrieval = LayerCore(core.index, len(r) * group, len(r), core.head_dim, core.scale,
                                   replace(core.config, selector=inner), core.impl, core.requests,
                                   r_info)
        self.retrieval.metrics = core.metrics


def _one_quantized_format(a: KVFormat, b: KVFormat) -> bool:
    """Both caches quantized pages of one format (not mixed: those promote per write), so the
    rows one encodes the other stores as they are."""
    return (hasattr(a, "encode_rows") and hasattr(b, "encode_rows") and not a.mixed and not b.mixed
            and a.name == b.name and a.row_bytes == b.row_bytes)


def planning_selector(selector: Selector, stored_apart: bool) -> Selector:
    """The selector a step is planned with: with streaming heads stored apart, the plan is the
    retrieval heads' (the split's inner method, dense when it has none)."""
    if not stored_apart:
        return selector
    return selector.retrieval or Dense()
