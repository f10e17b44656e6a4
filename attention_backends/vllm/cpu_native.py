"""vLLM's own CPU paged-attention op, driven by lcx (the CPU path for page-granular work).

The design lets lcx hand a page-granular selection (dense, sinks + window, selected pages) to
the engine's optimized paged op as a rewritten block table; dense is the identity rewrite.
That op stores keys in an ISA-specific packed layout, so on this path the cache is written
with the op's own writer too. Every vLLM-private name lcx touches on CPU lives here, so an
engine upgrade changes one file.
"""
from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa


def isa_for(dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str) -> str:
    return _get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, hkv, bs, _ = kv_cache.shape
    return kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)


def scheduler_metadata(*, num_reqs, num_heads, num_kv_heads, head_dim, seq_lens, dtype, query_start_loc, isa, kv_cache_dtype):
    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None, kv_cache_dtype=kv_cache_dtype,
    )


def write_kv(layer, key, value, kv_cache, slot_mapping, isa: str, kv_cache_dtype: str) -> None:
    key_cache, value_cache = _split(kv_cache)
    ops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, slot_mapping, isa,
        k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=kv_cache_dtype,
    )


def attention(layer, query, kv_cache, output, *, query_start_loc, seq_lens, block_table, scale, sched, kv_cache_dtype) -> None:
    key_cache, value_cache = _split(kv_cache)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0,
        scheduler_metadata=sched, s_aux=None, dynamic_causal=None,
        k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=kv_cache_dtype,
    )
