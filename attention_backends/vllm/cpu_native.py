"""vLLM's own CPU paged-attention op, driven by lcx: the dense kernel of lcx's default CPU path.

The op keeps its cache in an ISA-specific packing (keys transposed, or AMX tiles). lcx writes
that cache with the op's own writer, runs the op for every sequence that needs no selection
(token-identical to the stock backend, at its speed), and reads the same cache in place through
``formats.vllm_cpu`` for the sequences a selector serves. Every vLLM-private name used here comes
from ``compat``.
"""
from __future__ import annotations

import torch

from lcx_plugin.kernels.paged import BatchPlan, KVFormat, Selection, formats

from . import compat


def isa_for(dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str) -> str:
    return compat.cpu_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


def kv_format(kv_cache: torch.Tensor, isa: str) -> KVFormat:
    return formats.vllm_cpu(kv_cache, isa)


def _split(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, hkv, bs, _ = kv_cache.shape
    return kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)


def _folded(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as ``[num_blocks * Hkv, 1, ...]`` cells: each (block, head) cell is contiguous in
    the LBHNC layout, whatever the ISA packs inside it."""
    nb, hkv, bs, _ = kv_cache.shape
    return kv_cache.view(nb * hkv, 1, 2 * bs, -1).chunk(2, dim=2)


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


def _page_list_calls(plan: BatchPlan, selection: Selection, *, num_heads: int, head_dim: int, block_size: int,
                     dtype: torch.dtype, isa: str, kv_cache_dtype: str) -> list[tuple[int, int, BatchPlan]]:
    """(first KV head, last KV head + 1, plan with the rewritten block table and its work plan) per
    distinct head list. Index work only: memoised on the selection, so all layers sharing it pay once."""
    key = ("vllm-cpu-page-lists", isa, dtype, kv_cache_dtype)
    hit = selection.memo.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    bs, hkv = block_size, selection.counts.shape[1]
    group = num_heads // hkv
    counts = selection.counts[:, :, 0].long()  # [B, Hkv]
    width = int(counts.max())
    pages = selection.indices[:, :, 0, :width].long().clamp(min=0)  # [B, Hkv, width] logical
    seq_lens = plan.seq_lens.long()
    last_page = (seq_lens - 1) // bs
    last_listed = pages.gather(2, (counts - 1)[..., None])[..., 0]  # [B, Hkv]
    tail = torch.where(last_listed == last_page[:, None], seq_lens[:, None] - last_page[:, None] * bs, bs)
    lens = ((counts - 1) * bs + tail).to(torch.int32)  # [B, Hkv] tokens the op reads per head
    tables = plan.block_table.long().gather(1, pages.reshape(pages.shape[0], -1)).view_as(pages).to(torch.int32)
    same = hkv == 1 or (bool((tables == tables[:, :1]).all()) and bool((lens == lens[:, :1]).all()))
    if not same and plan.num_tokens == plan.num_seqs:
        # Decode only, per-head lists: fold the KV heads into the batch, one op call for all. Each
        # (sequence, KV head) becomes a sequence of one KV head whose "blocks" are the cache's
        # (block, head) cells, numbered block * Hkv + head (see ``_folded``).
        b = plan.num_seqs
        cells = (tables.long() * hkv + torch.arange(hkv)[None, :, None]).reshape(b * hkv, -1).to(torch.int32)
        flat = lens.reshape(-1).contiguous()
        starts = torch.arange(b * hkv + 1, dtype=torch.int32)
        sub = BatchPlan(starts, flat, cells, tuple(range(b * hkv + 1)), tuple(flat.tolist()))
        sched = scheduler_metadata(sub, num_heads=group, num_kv_heads=1, head_dim=head_dim, dtype=dtype, isa=isa,
                                   kv_cache_dtype=kv_cache_dtype)
        calls = [(-1, -1, BatchPlan(sub.query_start_loc, sub.seq_lens, sub.block_table, sub.starts, sub.lens, sched))]
        selection.memo[key] = (plan, calls)
        return calls
    calls = []
    for h0, h1 in ([(0, hkv)] if same else [(g, g + 1) for g in range(hkv)]):
        sub_lens = lens[:, h0].contiguous()
        host = tuple(sub_lens.tolist())
        # The work plan depends on the lengths alone, not on which pages: layers whose lists have
        # the same lengths (a fixed budget, sinks and window) share one, built by the first.
        sched_key = ("vllm-cpu-page-lists.schedule", isa, dtype, kv_cache_dtype, (h1 - h0) * group, h1 - h0, host)
        sched = plan.memo(sched_key, lambda: scheduler_metadata(
            BatchPlan(plan.query_start_loc, sub_lens, tables[:, h0], plan.starts, host),
            num_heads=(h1 - h0) * group, num_kv_heads=h1 - h0, head_dim=head_dim, dtype=dtype, isa=isa,
            kv_cache_dtype=kv_cache_dtype))
        calls.append((h0, h1, BatchPlan(plan.query_start_loc, sub_lens, tables[:, h0].contiguous(), plan.starts, host,
                                        sched)))
    selection.memo[key] = (plan, calls)
    return calls


def attention_page_lists(layer, query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor, plan: BatchPlan,
                         selection: Selection, *, scale: float, dtype: torch.dtype, isa: str,
                         kv_cache_dtype: str) -> None:
    """Decode over per-KV-head page lists with the engine's op: each KV head's pages become a
    rewritten block table and the op runs once per distinct list (once for all heads when they agree).
    Exact: at decode every listed page lies wholly before the query, except the sequence's current
    page, which as the highest page is listed last and read only up to the sequence's length."""
    hq, hkv = query.shape[1], kv_cache.shape[1]
    group = hq // hkv
    calls = _page_list_calls(plan, selection, num_heads=hq, head_dim=query.shape[2], block_size=kv_cache.shape[2],
                             dtype=dtype, isa=isa, kv_cache_dtype=kv_cache_dtype)
    ops = compat.cpu_ops()
    if calls[0][0] == -1:  # folded: [B * Hkv] one-head sequences over the cache's (block, head) cells
        sub = calls[0][2]
        key_cache, value_cache = _folded(kv_cache)
        folded_out = output if output.is_contiguous() else torch.empty_like(output)
        ops.cpu_attention_with_kv_cache(
            query=query.contiguous().view(-1, group, query.shape[2]), key_cache=key_cache, value_cache=value_cache,
            output=folded_out.view(-1, group, query.shape[2]), query_start_loc=sub.query_start_loc,
            seq_lens=sub.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=sub.block_table, softcap=0, scheduler_metadata=sub.engine, s_aux=None, dynamic_causal=None,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=kv_cache_dtype)
        if folded_out is not output:
            output.copy_(folded_out)
        return
    key_cache, value_cache = _split(kv_cache)
    for h0, h1, sub in calls:
        whole = h1 - h0 == hkv
        out = output if whole else torch.empty(query.shape[0], (h1 - h0) * group, query.shape[2], dtype=output.dtype)
        ops.cpu_attention_with_kv_cache(
            query=query[:, h0 * group: h1 * group], key_cache=key_cache[:, h0:h1], value_cache=value_cache[:, h0:h1],
            output=out, query_start_loc=sub.query_start_loc, seq_lens=sub.seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=sub.block_table, softcap=0, scheduler_metadata=sub.engine,
            s_aux=None, dynamic_causal=None, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=kv_cache_dtype)
        if not whole:
            output[:, h0 * group: h1 * group] = out
