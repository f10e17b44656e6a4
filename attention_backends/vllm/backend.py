"""The ``LCX`` attention backend for vLLM v1: translation between vLLM and lcx's layer core.

Roles follow vLLM's split: a stateless Backend of class methods, a Metadata dataclass, a Builder
that runs once per step for all layers (it turns vLLM's metadata into lcx's ``StepPlan``), and an
Impl per layer whose ``forward`` hands that plan to the layer's ``LayerCore``. No method logic
lives here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from lcx_plugin import machine, metrics
from lcx_plugin.config import LcxConfig, is_default, resolve_config
from lcx_plugin.kernels.paged import BatchPlan, KVFormat, formats, mixed, quant
from lcx_plugin.layer import LayerCore, StepPlan, plan_step, planning_selector
from lcx_plugin.selectors import LayerInfo
from lcx_plugin.log import get_logger
from lcx_plugin.state import RequestStates

from . import compat, kv_split

logger = get_logger()
_announced = False  # one log line per process proves lcx's own forward ran
REQUESTS = RequestStates()  # per-request state of this worker process, shared by all layers


def _drop_ended(gone: set[str], fresh: set[str]) -> None:
    """Finished and preempted requests lose their state; new and resumed ones start clean."""
    REQUESTS.drop(gone | fresh)


if _drop_ended not in compat.step_listeners:
    compat.step_listeners.append(_drop_ended)


def lcx_config_of(vllm_config) -> LcxConfig:
    """The lcx config of an engine config (``None``: none given); raises LcxConfigError on bad input."""
    return resolve_config(getattr(vllm_config, "additional_config", None) or {}, model=compat.served_model(vllm_config))


def current_lcx_config() -> LcxConfig:
    """The lcx config of the engine being built; raises LcxConfigError on bad input."""
    return lcx_config_of(get_current_vllm_config_or_none())


class LcxAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "LCX"

    @staticmethod
    def get_impl_cls() -> type["LcxAttentionImpl"]:
        return LcxAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["LcxMetadataBuilder"]:
        return LcxMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # [num_blocks, kv_heads, block_size, 2*head_dim]: see kernels/paged/formats.py
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        return super().validate_configuration(**kwargs) + lcx_reasons(get_current_vllm_config_or_none())


def lcx_reasons(vllm_config) -> list[str]:
    """Why lcx cannot serve ``vllm_config`` (empty: it can): its lcx config, the served model's
    shape against the method (head patterns), the lengths, the kernel on this machine. Checked
    where vLLM selects the backend, and earlier, where the config is built (the API server's
    process, through patches/vllm_cpu_backend_selection.py), so that ``vllm serve`` stops before
    it starts an engine."""
    try:
        config = lcx_config_of(vllm_config)
    except ValueError as e:  # LcxConfigError
        return [str(e)]
    reasons = []
    if vllm_config is not None and getattr(vllm_config, "model_config", None) is not None:
        reasons += config.selector.check_model(compat.model_shape(vllm_config))
        reasons += compat.length_reasons(config.selector, vllm_config)
    if config.kernel == "triton" and not torch.cuda.is_available() and not machine.triton_interpreted():
        reasons.append("lcx config: kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1, for tests); "
                       "on CPU use kernel 'auto'")
    return reasons


@dataclass
class LcxMetadata:
    num_actual_tokens: int
    step: StepPlan


class LcxMetadataBuilder(AttentionMetadataBuilder[LcxMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = resolve_config(vllm_config.additional_config or {}, model=compat.served_model(vllm_config))
        self.kernel = self.config.implementation(device, engine_op=True)
        model, parallel = vllm_config.model_config, vllm_config.parallel_config
        # Query heads over the KV heads this group's cache holds (fewer than the model's when a
        # head split stores its streaming heads apart).
        group = model.get_num_attention_heads(parallel) // model.get_num_kv_heads(parallel)
        self.num_heads = group * kv_cache_spec.num_kv_heads
        context = vllm_config.compilation_config.static_forward_context
        stored_apart = any(getattr(context.get(n), "lcx_split", None) is not None for n in layer_names)
        self.selector = planning_selector(self.config.selector, stored_apart)
        self.dtype = vllm_config.model_config.dtype
        self.kv_cache_dtype = vllm_config.cache_config.cache_dtype
        if device.type == "cpu":
            machine.warn_if_bf16_emulated(self.dtype)
        self.dense_engine_data = None
        if self.kernel == "engine":
            from . import cpu_native

            isa = cpu_native.isa_for(self.dtype, kv_cache_spec.block_size, kv_cache_spec.head_size, self.kv_cache_dtype)
            self.dense_engine_data = functools.partial(
                cpu_native.scheduler_metadata, num_heads=self.num_heads, num_kv_heads=kv_cache_spec.num_kv_heads,
                head_dim=kv_cache_spec.head_size, dtype=self.dtype, isa=isa, kv_cache_dtype=self.kv_cache_dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LcxMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise NotImplementedError("lcx supports causal decoder attention only")
        seq_lens_host = m.seq_lens if m.seq_lens.device.type == "cpu" else m.seq_lens.cpu()
        batch = BatchPlan(m.query_start_loc, m.seq_lens, m.block_table_tensor,
                          tuple(m.query_start_loc_cpu.tolist()), tuple(seq_lens_host.tolist()))
        step = plan_step(self.selector, batch, self._request_ids(m.num_reqs), self.dense_engine_data)
        metrics.dense_fallbacks(step, self.selector, metrics.worker_metrics(self.config))
        return LcxMetadata(m.num_actual_tokens, step)

    @staticmethod
    def _request_ids(num_reqs: int) -> tuple[str, ...]:
        rows = compat.batch_identity(num_reqs)
        if rows is None:  # a warm-up or profiling run: no requests, no state
            return tuple(f"row-{i}" for i in range(num_reqs))
        return tuple(rows)


class LcxAttentionImpl(AttentionImpl[LcxMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "sinks": sinks is not None,
            f"attn_type={attn_type}": attn_type != AttentionType.DECODER,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(f"lcx attention does not support {bad} yet")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.config = current_lcx_config()
        self.is_default = is_default(getattr(get_current_vllm_config_or_none(), "additional_config", None))
        # Built with the model, while vLLM's config and tensor-parallel groups are current.
        shape = compat.model_shape(get_current_vllm_config())
        self.placement = (shape, compat.kv_head_offset(self.num_kv_heads, shape.num_kv_heads))
        self.rope = compat.rope_for(get_current_vllm_config()) if getattr(self.config.selector, "extrapolate", False) \
            else None
        self.kernel: str | None = None  # resolved on first use, when the device is known
        self.isa: str | None = None
        self.core: LayerCore | None = None
        self._format: tuple[int, KVFormat] | None = None
        self.companion: str | None = None  # the companion layer holding this layer's streaming heads
        self._stream_format: tuple[int, KVFormat] | None = None

    def _setup(self, layer, kv_cache: torch.Tensor) -> LayerCore:
        if self.core is None:
            self.kernel = self.config.implementation(kv_cache.device, engine_op=True)
            if self.kernel == "engine":
                from . import cpu_native

                self.isa = cpu_native.isa_for(kv_cache.dtype, kv_cache.shape[2], self.head_size, self.kv_cache_dtype)
            impl = "torch" if self.kernel == "engine" else self.kernel
            index = compat.layer_index(layer.layer_name)
            info = LayerInfo(index, self.num_kv_heads, self.head_size, *self.placement)
            self.core = LayerCore(index, self.num_heads, self.num_kv_heads, self.head_size, self.scale, self.config,
                                  impl, REQUESTS, info, self.rope)
            self.core.metrics = recorder = metrics.worker_metrics(self.config)
            if recorder is not None:
                kv = self._kv(kv_cache)
                fmt = self.config.kv_format if self.config.quantized else str(kv_cache.dtype).removeprefix("torch.")
                recorder.layer_bytes(index, fmt, kv_cache.numel() * kv_cache.element_size()
                                     / (kv.num_blocks * kv.block_size))
            if getattr(layer, "lcx_split", None) is not None:  # streaming heads in a companion cache
                self.core.store_apart()
                self.companion = kv_split.companion_name(layer.layer_name)
        return self.core

    def _view(self, cache: torch.Tensor) -> KVFormat:
        """lcx's view of a cache of this layer: quantized pages, or plain pages of the cache's dtype."""
        if self.config.mixed:
            return mixed.mixed(cache, self.head_size, self.config.group_size(self.head_size), self.config.high_fraction)
        if self.config.quantized:
            bits = self.config.kv_bits
            return quant.quantized(cache, self.head_size, bits, self.config.group_size(self.head_size),
                                   quant.rotates_keys(self.head_size, bits))
        return formats.plain(cache)

    def _kv(self, kv_cache: torch.Tensor) -> KVFormat:
        """The storage-format view of this layer's cache (rebuilt if the engine rebinds it)."""
        key = kv_cache.data_ptr()
        if self._format is None or self._format[0] != key:
            if self.kernel == "engine":
                from . import cpu_native

                kv = cpu_native.kv_format(kv_cache, self.isa)
            else:
                kv = self._view(kv_cache)
            self._format = (key, kv)
        return self._format[1]

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.kv_sharing_target_layer_name is not None:
            return
        core = self._setup(layer, kv_cache)
        engine_write = None
        if self.kernel == "engine":
            from . import cpu_native

            def engine_write(k, v, slots):
                cpu_native.write_kv(layer, k, v, kv_cache, slots, self.isa, self.kv_cache_dtype)
        if self.companion is None:
            positions = None
            if core.summaries_need_positions:  # the step's plan, from this forward's metadata
                from vllm.forward_context import get_forward_context

                positions = get_forward_context().attn_metadata[layer.layer_name].step.positions
            core.write(self._kv(kv_cache), key, value, slot_mapping, engine_write, positions)
            return
        kv_s, meta_s = self._companion()
        n = key.shape[0]
        slots = meta_s.slot_mapping[:n]
        # Logical pages the companion does not keep are vLLM's null block (block 0): never written.
        slots = torch.where(slots < kv_s.block_size, -1, slots)
        core.write_split(self._kv(kv_cache), kv_s, key, value, slot_mapping, slots, engine_write)

    def _companion(self) -> tuple[KVFormat, "kv_split.StreamMetadata"]:
        """The streaming heads' cache (lcx's plain pages) and this step's metadata for it."""
        from vllm.forward_context import get_forward_context

        context = get_forward_context()
        cache = context.no_compile_layers[self.companion].kv_cache
        if self._stream_format is None or self._stream_format[0] != cache.data_ptr():
            self._stream_format = (cache.data_ptr(), self._view(cache))
        return self._stream_format[1], context.attn_metadata[self.companion]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lcx does not fuse output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        core = self._setup(layer, kv_cache)
        global _announced
        if not _announced:
            logger.info("lcx attention active: method=%s kernel=%s device=%s heads=%d/%d head_dim=%d config: %s",
                        self.config.method, self.kernel, query.device.type, self.num_heads, self.num_kv_heads,
                        self.head_size, self.config.describe())
            if self.is_default:
                logger.info("lcx: no lcx config given, so this is lcx's recommended default (README, \"The default\"); "
                            "--additional-config '{\"lcx\": {\"method\": \"dense\"}}' serves the stock arithmetic")
            _announced = True
        n = attn_metadata.num_actual_tokens
        dense_kernel = page_kernel = None
        if self.kernel == "engine":
            from . import cpu_native

            def dense_kernel(q, out, plan):
                cpu_native.attention(layer, q, kv_cache, out, plan, scale=self.scale, kv_cache_dtype=self.kv_cache_dtype)

            def page_kernel(q, out, plan, selection):
                cpu_native.attention_page_lists(layer, q, kv_cache, out, plan, selection, scale=self.scale,
                                                dtype=query.dtype, isa=self.isa, kv_cache_dtype=self.kv_cache_dtype)
        if self.companion is None:
            own = (key[:n], value[:n]) if key is not None and value is not None else (None, None)
            core.run(query[:n], self._kv(kv_cache), attn_metadata.step, output[:n], dense_kernel, page_kernel, *own)
            return output
        kv_s, meta_s = self._companion()
        core.run_split(query[:n], key[:n], value[:n], self._kv(kv_cache), kv_s, attn_metadata.step, meta_s.plan,
                       output[:n], dense_kernel, page_kernel)
        return output
