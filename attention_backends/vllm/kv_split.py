"""The KV-cache spec hook: streaming heads that really save memory in vLLM (a companion KV-cache
group per layer), and quantized pages that shrink every page (``kv_format``).

With ``head_split``, each lcx attention layer ``L`` becomes two KV-cache layers for vLLM's cache
manager:

- ``L`` itself, its spec shrunk to the **retrieval** KV heads (a full-attention group);
- ``L.lcx_stream``, a companion that holds the **streaming** KV heads under ``StreamSpec``: a
  sliding-window spec that also keeps the sink pages, managed by ``StreamManager``.

vLLM then groups, allocates, binds and tracks the companion itself (its own block table, slot
mapping and metadata, from the same memory pool), and its reported KV capacity grows by what the
streaming heads no longer hold.

``StreamManager`` keeps per request only the pages of the first ``sink`` tokens and of the last
``window`` tokens. It does not reserve pages for a whole prefill chunk: logical pages that will
have left the window once the chunk is computed are the engine's null block, and lcx never writes
or reads them (``kernels/paged/window.py`` attends to the chunk's own keys from the step's input).
Its capacity accounting is the true peak, sink + twice (window + one page), since while a long
chunk runs the previous window is still held as the new one is written.

Prefix caching: the companion never reports a hit, so vLLM's hybrid coordinator (which takes the
shortest hit over all groups) recomputes the prompt; outputs stay correct, prompts are not shared.
Preemption frees every page; the request is recomputed from the start.

Every vLLM name used here is from the 0.32 wheel (see ``compat.SUPPORTED``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from lcx_plugin.errors import LcxConfigError
from lcx_plugin.kernels.paged import BatchPlan
from lcx_plugin.log import get_logger

SUFFIX = "lcx_stream"
logger = get_logger()


def companion_name(layer_name: str) -> str:
    return f"{layer_name}.{SUFFIX}"


# -- the spec and its manager ------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StreamSpec(SlidingWindowSpec):
    """A sliding window (``sliding_window`` tokens) that also keeps the first ``sink_len`` tokens.
    Being a ``SlidingWindowSpec`` keeps it in a group of its own, apart from full attention."""

    sink_len: int = 0

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sink_len, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window_blocks = cdiv(min(self.sliding_window, max_model_len), self.block_size) + 1
        # Peak: while a chunk runs, the previous window is held as the new tail is written.
        return min(self.sink_blocks + 2 * window_blocks, cdiv(max_model_len, self.block_size))


class StreamManager(SlidingWindowManager):
    """Pages of the sinks and of the window only; never a whole chunk; never a prefix hit."""

    def __init__(self, kv_cache_spec: StreamSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks
        self._freed_upto: dict[str, int] = {}  # first logical page that may still be live, per request

    def _plan(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list[bool]:
        """Per new logical page of the request: a real page (True) or the null block."""
        have = len(self.req_to_blocks.get(request_id, ()))
        need = cdiv(num_tokens, self.block_size)
        # After this step the next query sits at num_tokens_main_model and sees the window before it.
        tail = self.get_num_skipped_tokens(num_tokens_main_model) // self.block_size
        return [i < self.sink_blocks or i >= tail for i in range(have, need)]

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        return sum(self._plan(request_id, num_tokens, num_tokens_main_model))

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        plan = self._plan(request_id, num_tokens, num_tokens_main_model)
        fresh = iter(self.block_pool.get_new_blocks(sum(plan)))
        out = [next(fresh) if real else self._null_block for real in plan]
        self.req_to_blocks[request_id].extend(out)
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in out if not b.is_null)
        # The null placeholders are returned too: the worker appends every id, which keeps its
        # block-table row positional (logical page i at column i).
        return out

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        """Free the pages between the sinks and the window. Scans the whole range from where it
        stopped last time: with null holes, the base class's backward scan would stop early."""
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        end = min(self.get_num_skipped_tokens(processed_computed_tokens) // self.block_size, len(blocks))
        start = max(self.sink_blocks, self._freed_upto.get(request_id, 0))
        if end <= start:
            return
        freed = []
        for i in range(start, end):
            if not blocks[i].is_null:
                freed.append(blocks[i])
                blocks[i] = self._null_block
        self._freed_upto[request_id] = end
        if freed:
            self.block_pool.free_blocks(freed)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        # Never a hit: the coordinator takes the shortest hit over all groups, so the whole request
        # is recomputed and the sinks are never missing.
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries) -> None:
        self.num_cached_block[request.request_id] = num_tokens // self.block_size

    def pop_blocks_for_free(self, request_id: str):
        self._freed_upto.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def _register_spec() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry.register(StreamSpec, StreamManager, uniform_type_base_spec=StreamSpec)


_hooked = False


def install() -> None:
    """Register ``StreamSpec`` in every process (plugin ``register()``): chained onto the platform
    hook that vLLM calls when it first fills its spec registry, right after its own specs. Never
    fill the registry here: an early registration would make vLLM skip its built-in specs."""
    global _hooked
    if _hooked:
        return
    from vllm.platforms import current_platform

    cls = type(current_platform)
    original = cls.register_custom_kv_cache_specs.__func__

    def register_custom_kv_cache_specs(klass, vllm_config):
        original(klass, vllm_config)
        _register_spec()

    cls.register_custom_kv_cache_specs = classmethod(register_custom_kv_cache_specs)
    _hooked = True


def ensure_registered() -> None:
    """In a process that builds layers: make sure the registry holds vLLM's specs and ours."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    _register_spec()


# -- the companion layer, its backend and metadata -----------------------------------------------
@dataclass
class StreamMetadata:
    plan: BatchPlan  # the companion's block table (logical page -> its own physical pages)
    slot_mapping: torch.Tensor


class StreamMetadataBuilder(AttentionMetadataBuilder[StreamMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, m: CommonAttentionMetadata, fast_build: bool = False) -> StreamMetadata:
        seq_lens_host = m.seq_lens if m.seq_lens.device.type == "cpu" else m.seq_lens.cpu()
        plan = BatchPlan(m.query_start_loc, m.seq_lens, m.block_table_tensor, tuple(m.query_start_loc_cpu.tolist()),
                         tuple(seq_lens_host.tolist()))
        return StreamMetadata(plan, m.slot_mapping)


class _NoForward(AttentionImpl[StreamMetadata]):
    """The companion is never called: its parent layer's impl reads and writes its cache."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def do_kv_cache_update(self, *args, **kwargs) -> None:
        pass

    def forward(self, *args, **kwargs):
        raise RuntimeError("the lcx streaming companion has no forward of its own")


def _stream_backend():
    from .backend import LcxAttentionBackend

    class LcxStreamBackend(LcxAttentionBackend):
        """The companion's backend: lcx's cache shape, a metadata builder that hands over its block
        table and slot mapping, no forward."""

        @staticmethod
        def get_impl_cls():
            return _NoForward

        @staticmethod
        def get_builder_cls():
            return StreamMetadataBuilder

        @classmethod
        def validate_configuration(cls, **kwargs) -> list[str]:
            return []

    return LcxStreamBackend


_STREAM_BACKEND = None


def stream_backend():
    global _STREAM_BACKEND
    if _STREAM_BACKEND is None:
        _STREAM_BACKEND = _stream_backend()
    return _STREAM_BACKEND


class StreamCompanion(AttentionLayerBase):
    """``static_forward_context["L.lcx_stream"]``: the streaming heads' cache of layer ``L``."""

    attn_type: ClassVar[str] = AttentionType.DECODER
    supports_dcp: ClassVar[bool] = False

    def __init__(self, parent, num_streaming: int, block_size: int, sink: int, window: int,
                 cell_bytes: int | None = None) -> None:
        self.layer_name = companion_name(parent.layer_name)
        self.num_kv_heads = num_streaming
        self.num_heads = num_streaming * (parent.num_heads // parent.num_kv_heads)
        self.head_size = parent.head_size
        self.head_size_v = parent.head_size_v
        self.dtype = parent.kv_cache_torch_dtype
        self.kv_sharing_target_layer_name = None
        self.kv_cache = torch.tensor([])
        self.impl = _NoForward()
        self.block_size, self.sink, self.window = block_size, sink, window
        self.cell_bytes = cell_bytes  # quantized pages: the packed (slot, head) cell, as the parent's

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache

    def get_attn_backend(self):
        return stream_backend()

    def get_kv_cache_spec(self, vllm_config) -> StreamSpec:
        return StreamSpec(block_size=self.block_size, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                          head_size_v=self.head_size_v, dtype=self.dtype, sliding_window=self.window,
                          sink_len=self.sink, state_content_bytes=self.cell_bytes)


# -- wiring into vLLM's Attention layers ---------------------------------------------------------
def companion_block_size(main_block: int, retrieval: int, streaming: int) -> int:
    """The companion's page holds as many bytes as the layer's own (so vLLM needs no page-size
    unification): ``main_block * retrieval / streaming`` tokens, a multiple of 16."""
    size, rem = divmod(main_block * retrieval, streaming)
    if rem or size % 16:
        raise LcxConfigError(
            f"lcx head_split: {retrieval} retrieval and {streaming} streaming KV heads per layer with vLLM block size "
            f"{main_block} give the streaming cache a page of {main_block * retrieval / streaming:g} tokens; it must be "
            f"a whole multiple of 16. Choose a streaming_fraction that fits, or a different --block-size")
    return size


def packed_cell_bytes(config, head_size: int, block_size: int) -> int | None:
    """Bytes of one (page slot, KV head) cell, keys and values, under a quantized ``kv_format``
    (vLLM's ``AttentionSpec.state_content_bytes``); None for the engine's own dtype."""
    if not config.quantized:
        return None
    from lcx_plugin.kernels.paged import mixed, quant

    if config.mixed:
        return mixed.cell_bytes(head_size, config.group_size(head_size), block_size, config.high_fraction)
    return 2 * quant.row_bytes(head_size, config.kv_bits, config.group_size(head_size))


def attach(layer, vllm_config) -> None:
    """Called after an lcx ``Attention`` layer is built. Quantized pages (``kv_format``): the
    layer's spec declares the packed cell size, so vLLM sizes, counts and allocates smaller
    pages. A head split with streaming heads to store apart: shrink the layer's spec to its
    retrieval heads and register the companion. Leaves every other layer as it is."""
    from lcx_plugin.config import resolve_config
    from lcx_plugin.selectors import LayerInfo

    from . import compat

    if layer.attn_type != AttentionType.DECODER or layer.kv_sharing_target_layer_name:
        return
    config = resolve_config(vllm_config.additional_config or {}, model=compat.served_model(vllm_config))
    cell = packed_cell_bytes(config, layer.head_size, vllm_config.cache_config.block_size)
    if cell is not None:
        packed_spec = layer.get_kv_cache_spec

        def get_packed_spec(vc):
            spec = packed_spec(vc)
            return None if spec is None else replace(spec, state_content_bytes=cell)

        layer.get_kv_cache_spec = get_packed_spec
    selector = config.selector
    if selector.name != "head_split" or not selector.stores_apart:
        return
    shape = compat.model_shape(vllm_config)
    index = compat.layer_index(layer.layer_name)
    split = selector.prepare_layer(LayerInfo(index, layer.num_kv_heads, layer.head_size, shape,
                                             compat.kv_head_offset(layer.num_kv_heads, shape.num_kv_heads)))
    streaming, retrieval = len(split.streaming_heads), len(split.retrieval_heads)
    if streaming == 0 or retrieval == 0:
        return  # nothing to store apart (all streaming: use the "streaming" method)
    block = companion_block_size(vllm_config.cache_config.block_size, retrieval, streaming)
    ensure_registered()
    companion = StreamCompanion(layer, streaming, block, selector.sink, selector.window, cell)
    context = vllm_config.compilation_config.static_forward_context
    if companion.layer_name in context:
        raise ValueError(f"duplicate layer name {companion.layer_name}")
    context[companion.layer_name] = companion
    own_spec = layer.get_kv_cache_spec

    def get_kv_cache_spec(vc):
        spec = own_spec(vc)
        return None if spec is None else replace(spec, num_kv_heads=retrieval)

    layer.get_kv_cache_spec = get_kv_cache_spec
    layer.lcx_split = split
