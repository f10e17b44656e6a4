"""``head_split``: retrieval heads keep every token, streaming heads keep sinks + a recent window.

DuoAttention (Xiao et al., ICLR 2025, https://arxiv.org/abs/2410.10819) and RazorAttention
(Tang et al., https://arxiv.org/abs/2407.15891) observe that only a minority of attention heads
retrieve from far back in the context; the others attend to the first tokens and a recent window.
A head pattern (``lcx_plugin/head_patterns.py``; ``lcx calibrate`` makes one) scores every KV head;
the lowest-scoring ``streaming_fraction`` of them (or those below ``threshold``) become streaming
heads. Retrieval heads are served by an inner method (``retrieval``; dense when omitted).

The selection is per KV head: streaming heads get the window, retrieval heads whatever the inner
method chose. On vLLM, the adapter also stores the streaming heads apart, in a cache group that
holds only their sinks and window, so their memory is really saved (``kv_split`` below).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from lcx_plugin import head_patterns
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.kernels.paged import BatchPlan, Selection
from lcx_plugin.head_patterns import HeadPattern, ModelShape

from . import register
from .base import LayerInfo, SelectContext, Selector, WindowedSelector, require

DEFAULT_FRACTION = 0.5


@dataclass(frozen=True)
class HeadSplitLayer:
    """One layer's split on this rank: which of its KV heads stream, and the inner method's data."""

    streaming: torch.Tensor  # [num_kv_heads] bool
    inner_data: object = None

    @functools.cached_property
    def key(self) -> tuple[bool, ...]:
        return tuple(bool(x) for x in self.streaming)

    @property
    def retrieval_heads(self) -> list[int]:
        return [i for i, s in enumerate(self.key) if not s]

    @property
    def streaming_heads(self) -> list[int]:
        return [i for i, s in enumerate(self.key) if s]


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> HeadPattern:
    return head_patterns.load(path)


@register
@dataclass(frozen=True)
class HeadSplit(WindowedSelector):
    """Retrieval heads: every token (or the inner method's choice); streaming heads: sinks + window.

    pattern: a head-pattern file (lcx JSON or DuoAttention's full_attention_heads.tsv), or "auto"
        for the pattern lcx ships for the served model.
    streaming_fraction: fraction of each layer's KV heads that stream, its lowest-scoring ones
        (default 0.5 when no threshold is given). Every layer then streams the same number of heads,
        which is what lets vLLM keep the streaming heads in one cache group of their own.
    threshold: instead of a fraction, heads scoring below this stream.
    retrieval: the method that serves the retrieval heads, as its own object (default: dense).
    save_memory: on vLLM's CPU build, store the streaming heads apart, holding only their sinks and
        window, so the engine's KV capacity grows (default true); false keeps every head's cache.
        Only a ``streaming_fraction`` split is stored apart (``stores_apart``): a ``threshold`` may
        stream a different number of heads in each layer, so it is applied as a selection only.
    sink, window: what a streaming head keeps; min_context: shorter contexts stay dense.
    """

    name: ClassVar[str] = "head_split"
    no_extrapolation: ClassVar[str | None] = "its retrieval heads attend densely, at absolute positions"
    short_context_example: ClassVar[dict] = {"streaming_fraction": 0.67, "sink": 16, "window": 128}
    sink: int = 64
    window: int = 256
    pattern: str = "auto"
    streaming_fraction: float | None = None
    threshold: float | None = None
    retrieval: Selector | None = None
    save_memory: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.streaming_fraction is None or self.threshold is None,
                "lcx config: head_split takes streaming_fraction or threshold, not both")
        if self.streaming_fraction is not None:
            require(0.0 <= self.streaming_fraction <= 1.0,
                    f"lcx config: streaming_fraction={self.streaming_fraction} must be in [0, 1]")
        require(bool(self.pattern), "lcx config: pattern must be a file path or \"auto\"")
        require(not isinstance(self.retrieval, HeadSplit), "lcx config: head_split cannot nest another head_split")

    @property
    def stores_apart(self) -> bool:
        """The streaming heads live in a cache group of their own (vLLM, ``kv_split``): asked for,
        and every layer streams the same number of heads (a fraction, not a threshold)."""
        return self.save_memory and self.threshold is None

    def prefix_cache_hits(self) -> bool:
        return not self.stores_apart  # stored apart: the streaming group never reports a hit (kv_split)

    # -- the pattern ---------------------------------------------------------------------------
    def pattern_path(self, model: ModelShape) -> str:
        if self.pattern != "auto":
            return self.pattern
        found = head_patterns.shipped(model.name)
        if found is None:
            shipped = sorted(p.stem for p in head_patterns.SHIPPED.glob("*.json"))
            raise LcxConfigError(f"lcx config: head_split pattern=\"auto\" has no shipped pattern for model "
                                 f"{model.name!r} (shipped: {shipped}); make one with `lcx calibrate` and pass "
                                 f"its path as \"pattern\"")
        return str(found)

    def load_pattern(self, model: ModelShape) -> HeadPattern:
        path = self.pattern_path(model)
        try:
            mtime = head_patterns.Path(path).expanduser().stat().st_mtime_ns
        except (OSError, RuntimeError):  # missing, or a ~user unknown here: loading says which, clearly
            mtime = 0
        pattern = _load(path, mtime)
        problems = pattern.check(model)
        if problems:
            raise LcxConfigError(f"head pattern {path} does not fit the served model {model.name or ''}: "
                                 + "; ".join(problems))
        return pattern

    def streaming_mask(self, model: ModelShape) -> torch.Tensor:
        """``[layers, kv_heads]`` bool over the whole model: True = streaming head."""
        fraction = self.streaming_fraction
        if fraction is None and self.threshold is None:
            fraction = DEFAULT_FRACTION
        return self.load_pattern(model).streaming_mask(fraction, self.threshold, per_layer=fraction is not None)

    def check_model(self, model: ModelShape) -> list[str]:
        try:
            self.streaming_mask(model)
        except LcxConfigError as e:
            return [str(e)]
        return self.retrieval.check_model(model) if self.retrieval is not None else []

    def prepare_layer(self, layer: LayerInfo) -> HeadSplitLayer:
        mask = self.streaming_mask(layer.model)[layer.index]
        mine = mask[layer.kv_head_offset: layer.kv_head_offset + layer.num_kv_heads].clone()
        inner = self.retrieval.prepare_layer(layer) if self.retrieval is not None else None
        return HeadSplitLayer(mine, inner)

    # -- per step ------------------------------------------------------------------------------
    def dense_rows(self, plan: BatchPlan) -> list[bool]:
        windowed = super().dense_rows(plan)
        if self.retrieval is None:
            return windowed
        return [a and b for a, b in zip(windowed, self.retrieval.dense_rows(plan))]

    def select(self, ctx: SelectContext) -> Selection | None:
        """One selection over all of the layer's KV heads (the storage holds them together)."""
        split: HeadSplitLayer = ctx.layer_data
        inner = None
        if self.retrieval is not None:
            inner = self.retrieval.select(_with_layer_data(ctx, split.inner_data))
        if not any(split.key):
            return inner
        if inner is None:
            if all(split.key):
                return self.shared_window_selection(ctx)
            key = ("head_split", self.sink, self.window, split.key)
            if key not in ctx.step:  # layers with the same split share it (and its kernel prep)
                ctx.step[key] = self._merge(ctx, split, None)
            return ctx.step[key]
        return self._merge(ctx, split, inner)

    def _merge(self, ctx: SelectContext, split: HeadSplitLayer, inner: Selection | None) -> Selection:
        b, device = ctx.plan.num_seqs, ctx.query.device
        streaming = split.streaming.to(device)[None, :].expand(b, -1)
        if inner is None:
            return Selection.build(b, ctx.num_kv_heads, sink=torch.where(streaming, self.sink, 0),
                                   window=torch.where(streaming, self.window, 0), dense=~streaming, device=device)
        counts = inner.counts.masked_fill(streaming[..., None], 0)
        return Selection(inner.granularity, inner.indices, counts,
                         torch.where(streaming, self.sink, inner.sink).to(torch.int32),
                         torch.where(streaming, self.window, inner.window).to(torch.int32),
                         inner.dense & ~streaming, inner.query_block)

    def streaming_only(self) -> WindowedSelector:
        """The selector of the streaming heads alone (for storage that keeps them apart)."""
        from .streaming import Streaming

        return Streaming(sink=self.sink, window=self.window, min_context=self.min_context)


def _with_layer_data(ctx: SelectContext, data) -> SelectContext:
    from dataclasses import replace

    return replace(ctx, layer_data=data)
