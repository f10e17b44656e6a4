"""Sink + window attention over a cache that keeps only sinks and windows, plus this step's own keys.

Storage that saves memory for streaming heads (vLLM's companion KV group, ``kv_split``) keeps, per
sequence, only the pages of its first ``sink`` tokens and of its most recent ``window`` tokens. A
prefill chunk longer than the window is therefore never cached whole: its rows attend to the
cached sinks, to the cached window before the chunk, and to the chunk's own keys and values, taken
from the step's incoming ``key``/``value`` rather than from the cache. Pages outside those ranges
may hold another request's data (the engine reuses them), so they are never read.

For query row ``i`` of sequence ``b`` at position ``p = c + i`` (``c = seq_len - q_len`` tokens
were cached before this step) the candidates are the positions ``j <= p`` with ``j < sink`` or
``j > p - window``: positions ``< c`` come from the cache, the rest from the step's keys.

Two implementations share the signature: ``window_attention`` (the torch twin, one pass per
sequence over only the needed pages) and ``window_attention_reference`` (float64, one token at a
time: the tests' oracle).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_op, quant
from .formats import KVFormat
from .plan import BatchPlan


def _check(query, kv: KVFormat, plan: BatchPlan, out, key, value, sink: int, window: int) -> None:
    t, hq, d = query.shape
    if d != kv.head_dim or hq % kv.num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not fit a cache of {kv.num_kv_heads} heads x {kv.head_dim}")
    if key.shape[0] < plan.num_tokens or key.shape[1:] != (kv.num_kv_heads, d) or value.shape != key.shape:
        raise ValueError(f"key/value {tuple(key.shape)}/{tuple(value.shape)} must be [>= {plan.num_tokens}, "
                         f"{kv.num_kv_heads}, {d}]")
    if out.shape[0] < plan.num_tokens or out.shape[1:] != query.shape[1:]:
        raise ValueError(f"out {tuple(out.shape)} cannot hold query {tuple(query.shape)}")
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink} window={window}")


def cached_positions(cached: int, sink: int, window: int) -> torch.Tensor:
    """The cached positions a step starting at position ``cached`` can need: the sinks, and the
    window before the step's first row."""
    n_sink = min(sink, cached)
    return torch.cat([torch.arange(n_sink), torch.arange(max(n_sink, cached - window + 1), cached)])


#: Query rows per tile of a long chunk: each tile reads the sinks and only the keys within one
#: window of its rows, so a chunk costs O(rows x (sink + window + tile)), not O(rows^2).
ROW_TILE = 256


def window_attention(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float, out: torch.Tensor,
                     sink: int, window: int, key: torch.Tensor, value: torch.Tensor,
                     row_tile: int = ROW_TILE) -> torch.Tensor:
    """``query`` ``[T, Hq, D]``, ``key``/``value`` ``[T, Hkv, D]`` (this step's, row-aligned with
    ``query``) -> ``out[:T]``. See the module docstring."""
    _check(query, kv, plan, out, key, value, sink, window)
    hkv, d, bs = kv.num_kv_heads, kv.head_dim, kv.block_size
    group = query.shape[1] // hkv
    heads = torch.arange(hkv, device=query.device)
    decoding = [b for b in range(plan.num_seqs) if plan.starts[b + 1] - plan.starts[b] == 1 and plan.lens[b] > 1]
    if decoding:
        _decode_rows(query, kv, plan, scale, out, sink, window, key, value, decoding)
    batched = set(decoding)
    for b in range(plan.num_seqs):
        s, e = plan.starts[b], plan.starts[b + 1]
        q = e - s
        if q == 0 or b in batched:
            continue
        c = plan.lens[b] - q
        cpos = cached_positions(c, sink, window).to(query.device)
        new_pos = torch.arange(c, c + q, device=query.device)
        k_new, v_new = key[s:e].transpose(0, 1).float(), value[s:e].transpose(0, 1).float()  # [Hkv, q, D]
        if cpos.numel():
            pages = torch.unique(cpos // bs)  # only the pages that hold needed positions
            blocks = plan.block_table[b, pages].long()
            kc, vc = kv.gather(blocks[:, None].expand(-1, hkv), heads[None, :].expand(len(pages), -1), torch.float32)
            slot = torch.searchsorted(pages, cpos // bs) * bs + cpos % bs  # index into the gathered pages
            kc = kc.permute(1, 0, 2, 3).reshape(hkv, -1, d).index_select(1, slot)
            vc = vc.permute(1, 0, 2, 3).reshape(hkv, -1, d).index_select(1, slot)
            keys, vals, kpos = torch.cat([kc, k_new], 1), torch.cat([vc, v_new], 1), torch.cat([cpos, new_pos])
        else:
            keys, vals, kpos = k_new, v_new, new_pos
        for r0 in range(0, q, row_tile):
            r1 = min(q, r0 + row_tile)
            p0, p1 = c + r0, c + r1  # this tile's positions [p0, p1)
            # Positions ascend: the sinks the tile can see are a prefix, its window one slice.
            n_sink = int(torch.searchsorted(kpos, torch.tensor(min(sink, p1))))
            lo = max(n_sink, int(torch.searchsorted(kpos, torch.tensor(p0 - window + 1))))
            hi = int(torch.searchsorted(kpos, torch.tensor(p1)))
            idx = torch.cat([torch.arange(n_sink), torch.arange(lo, hi)]).to(query.device)
            tk, tv, tpos = keys.index_select(1, idx), vals.index_select(1, idx), kpos.index_select(0, idx)
            p, j = new_pos[r0:r1, None], tpos[None, :]
            allowed = (j <= p) & ((j < sink) | (j > p - window))  # every row reads at least itself
            bias = torch.zeros(allowed.shape, dtype=torch.float32, device=query.device).masked_fill_(~allowed, float("-inf"))
            # One fused call per tile (an additive mask, shared by the heads): the scores, the
            # mask and the softmax never exist as separate [heads, rows, keys] passes.
            rows_q = query[s + r0: s + r1].float().transpose(0, 1)[None]  # [1, Hq, rows, D]
            o = F.scaled_dot_product_attention(rows_q, tk[None], tv[None], attn_mask=bias[None, None], scale=scale,
                                               enable_gqa=group > 1)
            out[s + r0: s + r1] = o[0].transpose(0, 1).to(out.dtype)
    return out


def _decode_rows(query, kv: KVFormat, plan: BatchPlan, scale: float, out, sink: int, window: int, key, value,
                 seqs: list[int]) -> None:
    """The one-row (decode) sequences ``seqs`` together, each with at least one cached token: the
    row at position ``c`` reads its sinks and the ``window - 1`` cached positions before it, padded
    to one width with copies of its last cached position (masked out of the softmax), plus its own
    key and value from the step. One gather and one SDPA call for the whole batch, where a loop
    per sequence costs a dozen small ops each; the gather's indices and the mask depend on the
    batch alone, so the step's first layer builds them for all (``BatchPlan.memo``)."""
    hkv, d = kv.num_kv_heads, kv.head_dim
    group = query.shape[1] // hkv
    n = len(seqs)
    # Computed in the cache's own floating dtype (SDPA accumulates in float32 whatever it reads):
    # converting the gathered keys and values first costs more than the attention.
    work = kv.dtype if kv.dtype.is_floating_point and not kv.packed else torch.float32
    rows, blocks, heads, offsets, bias = plan.memo(
        ("window.decode", sink, window, tuple(seqs), hkv, kv.block_size, work, str(query.device)),
        lambda: _decode_index(plan, seqs, sink, window, hkv, kv.block_size, work, query.device))
    width = blocks.shape[-1] - 1
    if cpu_op.serves(kv, query):
        spans = plan.memo(("window.decode.spans", sink, window, tuple(seqs), kv.block_size, str(query.device)),
                          lambda: _decode_spans(blocks, offsets, bias, width))
        own_k = kv.rotate_query(key.index_select(0, rows).float())  # scored against the rotated query
        o = cpu_op.decode_codes(kv.rotate_query(query.index_select(0, rows).float()), kv, spans, scale,
                                own_key=own_k, own_value=value.index_select(0, rows))
        out.index_copy_(0, rows, o.to(out.dtype))
        return
    if hasattr(kv, "gather_token_codes"):
        _decode_rows_codes(query, kv, scale, out, rows, blocks[..., :width], heads[..., :width], offsets[..., :width],
                           bias, key, value)
        return
    kc, vc = kv.gather_tokens(blocks, heads, offsets, work)  # [B, Hkv, width + 1, D]
    kc[:, :, width] = key.index_select(0, rows).to(work)
    vc[:, :, width] = value.index_select(0, rows).to(work)
    q = query.index_select(0, rows).to(work).view(n, hkv, group, d)  # a KV head's group as its query rows
    o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias, scale=scale)  # [B, Hkv, G, D]
    out.index_copy_(0, rows, o.reshape(n, hkv * group, d).to(out.dtype))


def _decode_spans(blocks, offsets, bias, width: int) -> torch.Tensor:
    """``_decode_index``'s cached candidates as the native op's spans ``[B, width, 3]``, one token
    each, the same for every KV head (the own column is passed apart; padding is a dead span)."""
    valid = bias[:, 0, 0, :width] == 0
    b0, o0 = blocks[:, 0, :width], offsets[:, 0, :width]
    return torch.stack([torch.where(valid, b0, -1), o0, o0 + 1], -1).to(torch.int32)


def _decode_rows_codes(query, kv, scale: float, out, rows, blocks, heads, offsets, bias, key, value) -> None:
    """``_decode_rows`` over quantized pages: attention on the cached codes (``quant.scores`` and
    ``quant.weighted_sum`` scale ``width`` scores, not ``width x D`` elements), plus each row's
    own key and value from the step, unquantized, as one more column."""
    n, hkv, width = blocks.shape
    d = kv.head_dim
    group = query.shape[1] // hkv
    kc, vc = kv.gather_token_codes(blocks, heads, offsets)  # [B, Hkv, width, D] each
    q = query.index_select(0, rows).float().view(n, hkv, group, d)
    own_k = key.index_select(0, rows).float()[:, :, None, :]  # [B, Hkv, 1, D]
    own_v = value.index_select(0, rows).float()[:, :, None, :]
    s = torch.cat([quant.scores(kv.rotate_query(q), kc), (q * own_k).sum(-1, keepdim=True)], -1).mul_(scale)
    probs = torch.softmax(s.add_(bias), dim=-1)  # [B, Hkv, G, width + 1]
    o = quant.weighted_sum(probs[..., :width], vc).addcmul_(probs[..., width:], own_v)
    out.index_copy_(0, rows, o.reshape(n, hkv * group, d).to(out.dtype))


def _decode_index(plan: BatchPlan, seqs: list[int], sink: int, window: int, hkv: int, bs: int, work: torch.dtype,
                  dev) -> tuple[torch.Tensor, ...]:
    """For ``_decode_rows``: the sequences' query rows; the cache cells to read, ``[B, Hkv,
    width + 1]`` blocks, heads and offsets (the last column, a copy of the last cached position,
    is overwritten with the step's own key and value); and the additive mask ``[B, 1, 1, width + 1]``."""
    n = len(seqs)
    rows = torch.tensor([plan.starts[b] for b in seqs], device=dev)
    cached = torch.tensor([plan.lens[b] - 1 for b in seqs], device=dev)  # c >= 1: tokens before the row
    n_sink = cached.clamp(max=sink)
    lo = torch.maximum(n_sink, cached - window + 1)  # first window position
    width = sink + window - 1
    i = torch.arange(width, device=dev)[None, :]
    pos = torch.where(i < n_sink[:, None], i, lo[:, None] + i - n_sink[:, None])  # [B, width]
    valid = pos < cached[:, None]
    pos = torch.minimum(pos, cached[:, None] - 1)  # padding re-reads a kept position: finite, then masked
    pos = torch.cat([pos, cached[:, None] - 1], 1)  # the row's own column
    valid = torch.cat([valid, torch.ones(n, 1, dtype=torch.bool, device=dev)], 1)
    table = plan.block_table[torch.tensor(seqs, device=dev)].long()
    shape = (n, hkv, width + 1)
    blocks = table.gather(1, pos // bs)[:, None].expand(shape)
    heads = torch.arange(hkv, device=dev)[None, :, None].expand(shape)
    offsets = (pos % bs)[:, None].expand(shape)
    bias = torch.zeros(n, 1, 1, width + 1, dtype=work, device=dev).masked_fill_(~valid[:, None, None, :], float("-inf"))
    return rows, blocks, heads, offsets, bias


def window_attention_reference(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float, sink: int,
                               window: int, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Float64, one token at a time; reads the cache only below each sequence's cached length."""
    t, hq, d = query.shape
    group = hq // kv.num_kv_heads
    bs = kv.block_size
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    for b in range(plan.num_seqs):
        s, q, seq_len = plan.starts[b], plan.q_len(b), plan.lens[b]
        c = seq_len - q
        table = plan.block_table[b].tolist()
        for h in range(hq):
            g = h // group
            for i in range(q):
                pos = c + i
                cand = [j for j in range(pos + 1) if j < sink or j > pos - window]
                ks, vs = [], []
                for j in cand:
                    if j < c:
                        k, v = kv.token(table[j // bs], g, j % bs)
                    else:
                        k, v = key[s + j - c, g], value[s + j - c, g]
                    ks.append(k.double())
                    vs.append(v.double())
                w = torch.softmax(scale * (torch.stack(ks) @ query[s + i, h].double()), dim=0)
                out[s + i, h] = w @ torch.stack(vs)
    return out
