"""vLLM's own CPU paged-attention op, driven by lcx: the dense kernel of lcx's default CPU path.

The op keeps its cache in an ISA-specific packing (keys transposed, or AMX tiles). lcx writes
that cache with the op's own writer, runs the op for every sequence that needs no selection
(token-identical to the stock backend, at its speed), and reads the same cache in place through
``formats.vllm_cpu`` for the sequences a selector serves. Every vLLM-private name used here comes
from ``compat``.
"""
from __future__ import annotations

import torch

from lcx_plugin.kernels.paged import BatchPlan, KVFormat, formats

from . import compat


def isa_for(dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str) -> str:
    return compat.cpu_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


def kv_format(kv_cache: torch.Tensor, isa: str) -> KVFormat:
    return formats.vllm_cpu(kv_cache, isa)


def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, hkv, bs, _ = kv_cache.shape
    return kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)


def scheduler_metadata(plan: BatchPlan, *, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       isa: str, kv_cache_dtype: str) -> torch.Tensor:
    """The op's per-thread work plan for ``plan``; built once per step."""
    return compat.cpu_ops().cpu_attn_get_scheduler_metadata(
        num_reqs=plan.num_seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=plan.seq_lens, dtype=dtype, query_start_loc=plan.query_start_loc, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=compat.cpu_attn_split_kv(),
        dynamic_causal=None, kv_cache_dtype=kv_cache_dtype,
    )


def write_kv(layer, key, value, kv_cache, slot_mapping, isa: str, kv_cache_dtype: str) -> None:
    key_cache, value_cache = _split(kv_cache)
    compat.cpu_ops().cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping, isa,
        k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=kv_cache_dtype,
    )


def attention(layer, query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor, plan: BatchPlan, *,
              scale: float, kv_cache_dtype: str) -> None:
    """Dense causal attention of ``plan``'s sequences; ``plan.engine`` holds the scheduler metadata.
    ``output`` must be contiguous (the op ignores its strides)."""
    key_cache, value_cache = _split(kv_cache)
    compat.cpu_ops().cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=plan.query_start_loc, seq_lens=plan.seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=plan.block_table, softcap=0,
        scheduler_metadata=plan.engine, s_aux=None, dynamic_causal=None,
        k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=kv_cache_dtype,
    )
