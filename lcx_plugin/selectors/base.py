"""What every selector shares: parameter validation, sinks + recent window, the dense threshold,
budgets and top-k.

A selector is a small frozen dataclass of hyperparameters with one hook, ``select``, that turns
one layer's queries (and, for scoring methods, its keys and per-page or per-request state) into a
``Selection``. It does no I/O: head patterns and calibration data are loaded elsewhere and handed
in. ``dense_rows`` runs once per engine step and says which sequences need no selection at all;
those go to the dense kernel (on vLLM's CPU build, the engine's own op).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from lcx_plugin.errors import LcxConfigError
from lcx_plugin.head_patterns import ModelShape
from lcx_plugin.kernels.paged import BatchPlan, KVFormat, Selection


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer as this process serves it. Under tensor parallelism a rank holds KV
    heads ``kv_head_offset .. kv_head_offset + num_kv_heads - 1`` of ``model.num_kv_heads``."""

    index: int
    num_kv_heads: int  # on this rank
    head_dim: int
    model: ModelShape  # the whole model, before any tensor-parallel split
    kv_head_offset: int = 0

    @classmethod
    def single(cls, index: int, num_kv_heads: int, head_dim: int, num_layers: int | None = None) -> "LayerInfo":
        """A layer of an unsplit model (tests, tools)."""
        return cls(index, num_kv_heads, head_dim, ModelShape(num_layers or index + 1, num_kv_heads, head_dim))


def first_kv_head(rank: int, tp_size: int, local_kv_heads: int, total_kv_heads: int) -> int:
    """The first global KV head tensor-parallel rank ``rank`` of ``tp_size`` holds, as both engines
    split attention: KV heads partitioned in order over the ranks, or, with fewer KV heads than
    ranks, each one replicated over ``tp_size / total_kv_heads`` consecutive ranks."""
    if total_kv_heads >= tp_size:
        return rank * local_kv_heads
    return rank // (tp_size // total_kv_heads)


@dataclass
class SelectContext:
    """Everything a selector may read for one layer and one batch of sequences (its ``plan``)."""

    layer: int
    query: torch.Tensor  # [plan.num_tokens, Hq, D]
    kv: KVFormat
    plan: BatchPlan
    request_ids: tuple[str, ...]  # one stable engine identity per sequence of ``plan``
    num_heads: int
    pages: Any = None  # PageSummaries of this layer when the selector asks for them
    requests: Any = None  # the per-request state (RequestStates), keyed by request id and layer
    step: dict = field(default_factory=dict)  # scratch shared by every layer of this step
    layer_data: Any = None  # what the selector's prepare_layer built for this layer
    scale: float | None = None  # the layer's softmax scale (None: 1/sqrt(head_dim))
    rope: Any = None  # the model's RoPE (kernels/paged/rope.Rope) when the selector extrapolates

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.query.shape[-1] ** -0.5

    @property
    def num_kv_heads(self) -> int:
        return self.kv.num_kv_heads


def _is_selector_type(hint: Any) -> bool:
    """A Selector class, or an optional one (``Selector | None``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_selector_type(h) for h in typing.get_args(hint))
    return isinstance(hint, type) and issubclass(hint, Selector)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, Selector):
        return 'an object such as {"method": "streaming", ...}'
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def require(ok: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: one clear LcxConfigError."""
    if not ok:
        raise LcxConfigError(message)


@dataclass(frozen=True)
class Selector(ABC):
    """Base of every method. Subclasses set ``name`` and are registered with ``@register``."""

    name: ClassVar[str] = ""
    needs_page_summaries: ClassVar[bool] = False  # per-page key min/max/mean, written with the cache
    needs_request_state: ClassVar[bool] = False  # per-request state, dropped on finish/preemption
    #: Parameters under which the method selects on contexts of a few hundred tokens: the
    #: reliability matrix (tests/reliability) runs every registered method with them, so a new
    #: method is covered there as soon as it says how to make it work on short prompts.
    short_context_example: ClassVar[dict[str, Any] | None] = None
    #: True when a prefill chunk's selection depends on where the scheduler cut the chunks (HiP's
    #: query blocks tile each chunk's rows), so chunked prefill is not position-for-position whole
    #: prefill; the reliability matrix then judges prompts by their mean gap.
    selection_follows_chunks: ClassVar[bool] = False
    #: True when every selection is the sinks and the window alone, the same for every head (no
    #: lists): a decode step then reads just those, with no selection built
    #: (``LayerCore._window_decode``), unless the method reads at compacted positions.
    window_only: ClassVar[bool] = False

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config", engine_keys: tuple[str, ...] = ()) -> "Selector":
        """Build from user JSON: unknown keys, wrong types and out-of-range values raise one
        LcxConfigError that names the key and what is allowed."""
        known = {f.name: f for f in cls.params()}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise LcxConfigError(f"lcx config from {source}: unknown key(s) {unknown} for method {cls.name!r}; "
                                 f"valid keys are {sorted([*engine_keys, *known])}")
        hints = typing.get_type_hints(cls)
        values = dict(data)
        for key, value in data.items():
            if _is_selector_type(hints[key]) and isinstance(value, Mapping):
                # Composition: a wrapper's inner method, given as its own {"method": ..., ...} object.
                from lcx_plugin import selectors

                inner = dict(value)
                method = inner.pop("method", None)
                if not isinstance(method, str):
                    raise LcxConfigError(f"lcx config from {source}: {key} needs a \"method\", one of {selectors.names()}")
                values[key] = selectors.get(method).from_dict(inner, f"{source} ({key})", ("method",))
            elif not _type_ok(value, hints[key]):
                raise LcxConfigError(f"lcx config from {source}: {key}={value!r} must be {_type_name(hints[key])}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in self.params():
            value = getattr(self, f.name)
            out[f.name] = {"method": value.name, **value.to_dict()} if isinstance(value, Selector) else value
        return out

    def check_model(self, model: ModelShape) -> list[str]:
        """Why this method cannot serve ``model`` (empty: it can). Called once at engine start, so
        that a head pattern for another model is one clear startup error, not a failure mid-run."""
        return []

    def prepare_layer(self, layer: LayerInfo) -> Any:
        """Per-layer data, built once when the layer core is made (head patterns, calibration data,
        loaded by a loader module, never with pickle); handed to ``select`` as ``ctx.layer_data``."""
        return None

    def prefix_cache_hits(self) -> bool:
        """Whether the engine's prefix cache can serve this method's prompts (a head split whose
        streaming heads are stored apart keeps only sinks + window pages: never a hit)."""
        return True

    def dense_rows(self, plan: BatchPlan) -> list[bool]:
        """Per sequence: True when it needs no selection this step (the default: all dense)."""
        return [True] * plan.num_seqs

    def dense_reason(self, q_len: int, seq_len: int) -> str:
        """Why ``dense_rows`` left a sequence of this step dense: the reason label of the
        ``lcx_dense_fallbacks`` series (a context too short to select from, by default)."""
        return "short_context"

    @abstractmethod
    def select(self, ctx: SelectContext) -> Selection | None:
        """The selection for the sequences of ``ctx.plan`` (None: dense)."""


@dataclass(frozen=True)
class WindowedSelector(Selector):
    """A selector that always keeps the first ``sink`` tokens and the ``window`` most recent ones
    (relative to each query), and leaves contexts shorter than ``min_context`` dense.

    sink: attention-sink tokens kept at the start (StreamingLLM).
    window: recent tokens kept before and including each query, at least 1.
    min_context: contexts shorter than this many tokens stay dense.
    extrapolate: read each query's tokens at compacted positions (sinks, then selected tokens, then
        the window, side by side), so that no query-key distance exceeds what it attends: prompts
        past the model's trained length (methods with ``extrapolates``).
    """

    #: Why this method cannot extrapolate (None: it can). A method can when every row it serves
    #: past the trained length, prefill included, attends through a selection.
    no_extrapolation: ClassVar[str | None] = "it does not select at every row"

    sink: int = 64
    window: int = 1024
    min_context: int = 0
    extrapolate: bool = False

    def __post_init__(self) -> None:
        require(self.sink >= 0, f"lcx config: sink={self.sink} must be >= 0")
        require(self.window >= 1, f"lcx config: window={self.window} must be >= 1 (it holds the query's own token)")
        require(self.min_context >= 0, f"lcx config: min_context={self.min_context} must be >= 0")
        require(not self.extrapolate or self.no_extrapolation is None,
                f"lcx config: method {self.name!r} cannot extrapolate: {self.no_extrapolation}")

    def longest_attended(self, seq_len: int, block_size: int) -> int:
        """The most tokens one query of a ``seq_len``-token context attends: with compacted
        positions, the largest query-key distance the model sees."""
        return min(seq_len, self.sink + self.window)

    def dense_rows(self, plan: BatchPlan) -> list[bool]:
        # Every row of a sequence no longer than sink + window sees its whole context anyway.
        return [s <= self.sink + self.window or s < self.min_context for s in plan.lens]

    def window_selection(self, ctx: SelectContext, **lists) -> Selection:
        """Sinks + window on every head of every sequence, plus optional ``lists``
        (``indices``, ``counts``, ``granularity``, ``query_block``)."""
        return Selection.build(ctx.plan.num_seqs, ctx.num_kv_heads, sink=self.sink, window=self.window,
                               device=ctx.query.device, **lists)

    def shared_window_selection(self, ctx: SelectContext) -> Selection:
        """The window selection, built once per step and shared by every layer (so the kernels'
        index work for it is done once too)."""
        key = ("window", self.sink, self.window, ctx.num_kv_heads)
        if key not in ctx.step:
            ctx.step[key] = self.window_selection(ctx)
        return ctx.step[key]


@dataclass(frozen=True)
class TopKSelector(WindowedSelector):
    """A windowed selector that also keeps a top-k of scored units (tokens or pages).

    budget: units kept beyond sinks and window: a count (int >= 1) or a fraction of the context
        (float in (0, 1]).
    """

    budget: int | float = 0.125

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, float):
            require(0.0 < self.budget <= 1.0, f"lcx config: budget={self.budget} as a fraction must be in (0, 1]")
        else:
            require(self.budget >= 1, f"lcx config: budget={self.budget} as a count must be >= 1")

    def budget_for(self, units: int) -> int:
        """How many of ``units`` candidates to keep."""
        k = self.budget if isinstance(self.budget, int) else max(1, round(self.budget * units))
        return min(k, units)

    def longest_attended(self, seq_len: int, block_size: int) -> int:
        # Page granularity keeps whole pages: the budget rounded up to pages, plus one partial page.
        return min(seq_len, self.sink + self.window + self.budget_for(seq_len) + block_size)


def top_k(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scoring units per row, ascending: ``scores`` ``[..., N]`` (higher = keep),
    ``eligible`` ``[..., N]`` bool (default: all). Returns ``indices [..., k]`` int32 (entries past
    the count are undefined) and ``counts [...]`` int32 (``min(k, eligible units)``)."""
    n = scores.shape[-1]
    k = min(k, n)
    if eligible is None:
        eligible = torch.ones_like(scores, dtype=torch.bool)
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    vals, idx = masked.topk(k, dim=-1) if k else (masked[..., :0], masked[..., :0].long())
    ok = vals > float("-inf")
    counts = ok.sum(-1).to(torch.int32)
    # Sort the kept indices ascending; the rejected ones sort past them.
    idx = torch.where(ok, idx, n + 1).sort(dim=-1).values
    return idx.to(torch.int32), counts

