"""The ``LCX`` attention backend for vLLM v1: translation between vLLM and lcx kernels.

Roles follow vLLM's split: a stateless Backend of class methods, a Metadata dataclass, a
Builder that runs once per step for all layers, and an Impl per layer whose ``forward``
writes into the caller's ``output`` and calls one lcx kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from lcx_plugin.config import LcxConfig, resolve_config
from lcx_plugin.kernels.paged import paged_attention, write_kv
from lcx_plugin.log import get_logger

logger = get_logger()
_announced = False  # one log line per process proves lcx's own forward ran


def current_lcx_config() -> LcxConfig:
    """The lcx config of the engine being built; raises LcxConfigError on bad input."""
    vllm_config = get_current_vllm_config_or_none()
    return resolve_config(getattr(vllm_config, "additional_config", None) or {})


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
        # [num_blocks, kv_heads, block_size, 2*head_dim]: see lcx_plugin/kernels/paged/layout.py
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def validate_configuration(cls, **kwargs) -> list[str]:
        reasons = super().validate_configuration(**kwargs)
        try:
            current_lcx_config()
        except ValueError as e:  # LcxConfigError: surfaced once, at backend selection
            reasons.append(str(e))
        return reasons


def resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "engine"
    if kernel == "engine" and device.type != "cpu":
        raise ValueError("lcx config: kernel='engine' is the vLLM CPU build's op; use 'triton' on GPUs")
    return kernel


@dataclass
class LcxMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int64
    cpu_schedule: torch.Tensor | None = None  # the engine CPU op's work plan (kernel="engine")


class LcxMetadataBuilder(AttentionMetadataBuilder[LcxMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.kernel = resolve_kernel(resolve_config(vllm_config.additional_config or {}).kernel, device)
        self.num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.dtype = vllm_config.model_config.dtype
        self.kv_cache_dtype = vllm_config.cache_config.cache_dtype
        if self.kernel == "engine":
            from . import cpu_native

            self.isa = cpu_native.isa_for(self.dtype, kv_cache_spec.block_size, kv_cache_spec.head_size, self.kv_cache_dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> LcxMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise NotImplementedError("lcx supports causal decoder attention only")
        schedule = None
        if self.kernel == "engine":
            from . import cpu_native

            schedule = cpu_native.scheduler_metadata(
                num_reqs=m.num_reqs, num_heads=self.num_heads, num_kv_heads=self.kv_cache_spec.num_kv_heads,
                head_dim=self.kv_cache_spec.head_size, seq_lens=m.seq_lens, dtype=self.dtype,
                query_start_loc=m.query_start_loc, isa=self.isa, kv_cache_dtype=self.kv_cache_dtype,
            )
        return LcxMetadata(
            cpu_schedule=schedule,
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
        )


class LcxAttentionImpl(AttentionImpl[LcxMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
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
        self.kernel: str | None = None  # resolved on first use, when the device is known
        self.isa: str | None = None

    def _resolve(self, kv_cache: torch.Tensor) -> str:
        if self.kernel is None:
            self.kernel = resolve_kernel(self.config.kernel, kv_cache.device)
            if self.kernel == "engine":
                from . import cpu_native

                self.isa = cpu_native.isa_for(kv_cache.dtype, kv_cache.shape[2], self.head_size, self.kv_cache_dtype)
        return self.kernel

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.kv_sharing_target_layer_name is not None:
            return
        if self._resolve(kv_cache) == "engine":
            from . import cpu_native

            cpu_native.write_kv(layer, key, value, kv_cache, slot_mapping, self.isa, self.kv_cache_dtype)
        else:
            write_kv(key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lcx does not fuse output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        kernel = self._resolve(kv_cache)
        global _announced
        if not _announced:
            logger.info(
                "lcx attention active: method=%s kernel=%s device=%s heads=%d/%d head_dim=%d",
                self.config.method, kernel, query.device.type,
                self.num_heads, self.num_kv_heads, self.head_size,
            )
            _announced = True
        n = attn_metadata.num_actual_tokens
        if kernel == "engine":
            from . import cpu_native

            cpu_native.attention(
                layer, query[:n], kv_cache, output[:n], query_start_loc=attn_metadata.query_start_loc,
                seq_lens=attn_metadata.seq_lens, block_table=attn_metadata.block_table, scale=self.scale,
                sched=attn_metadata.cpu_schedule, kv_cache_dtype=self.kv_cache_dtype,
            )
        else:
            paged_attention(
                query[:n], kv_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                attn_metadata.query_start_loc, self.scale, output[:n],
                impl=kernel, max_query_len=attn_metadata.max_query_len,
            )
        return output
