"""Mixed-precision pages (MiKV-style): every token stored at int4, the important ones also at int8.

Nothing is evicted: each token keeps its int4 row for as long as its page lives; a page also
holds a small pool of **high-precision slots**, and a token that holds one is read from it. A
(block, head) cell of ``block_size * C`` bytes (``C = cell_bytes(...)`` per token, the figure the
engine allocates by) is laid out as

    [ block_size int4 rows: key row then value row, 2 * R4 bytes each (``quant``'s layout) ]
    [ slots x (offset int16 | importance float16 | int8 key row R8 | int8 value row R8) ]
    [ padding to block_size * C ]

where ``offset`` is the token's index in the page (-1: the slot is free). Keys are stored in the
int4 rows' basis at both precisions (Hadamard-rotated when ``quant.rotates_keys``), so a kernel
that rotates the query once reads either; every reader returns them un-rotated.

**Which tokens.** ``promote`` ranks a page's candidates (the slots it holds and the tokens just
written into it) by importance and keeps the top ``slots`` per KV head; ties keep the lower offset,
so a slot, once held, is only lost to a strictly more important token. ``observed_importance``
gives a step's new tokens their importance from the attention they receive: within each
sequence's new chunk, the softmax share of the last ``OBSERVED`` query rows (the end of a prompt,
where a question sits), averaged over rows and over the query heads of the KV group, times the
chunk's length (1.0 is a uniform share). A decode token scores 0: it takes a free slot and never
displaces a prompt token, so every prompt row attends to the precisions its own step gave (and a
reference filling the cache the same way sees what each step saw). Attention sinks (the first
``sink`` positions) always score +inf.

**Writes.** ``write`` stores int4 rows and frees every slot at or past the lowest offset it wrote
in each page: a page fills in order, so whatever a slot held there belongs to an earlier owner of
the page (or to tokens now overwritten) and must never be read again. Shared prefix pages are never
written, so their slots stay valid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import BatchPlan
from .quant import BytePages, QuantKVFormat, check_params, decode, encode, hadamard, row_bytes, rotates_keys

LOW_BITS, HIGH_BITS = 4, 8
#: Query rows at the end of each new chunk whose attention scores the chunk's tokens.
OBSERVED = 32
#: The first positions of every sequence, kept at high precision whatever their score (attention sinks).
SINKS = 4
_HEADER = 4  # offset int16, importance float16


def slot_count(block_size: int, fraction: float) -> int:
    """High-precision slots per page: ``fraction`` of its tokens, at least one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the high-precision fraction must be in (0, 1], got {fraction}")
    return max(1, round(block_size * fraction))


def slot_bytes(head_dim: int, group_size: int) -> int:
    return _HEADER + 2 * row_bytes(head_dim, HIGH_BITS, group_size)


def cell_bytes(head_dim: int, group_size: int, block_size: int, fraction: float) -> int:
    """Bytes per (token slot, KV head) that a page of ``block_size`` tokens needs: its int4 rows
    plus its share of the slot pool, rounded up to 4 bytes (any cache dtype divides it)."""
    low = 2 * row_bytes(head_dim, LOW_BITS, group_size)
    pool = slot_count(block_size, fraction) * slot_bytes(head_dim, group_size)
    c = low + -(-pool // block_size)
    return -(-c // 4) * 4


@dataclass(frozen=True)
class MixedKVFormat(BytePages):
    """One layer's mixed-precision pages over the engine's byte buffer ``[num_blocks, Hkv,
    block_size, C]`` (a view, never a copy). Offers ``gather``, ``gather_tokens``, ``token`` and
    ``write`` as ``quant.QuantKVFormat`` does, plus ``promote``."""

    raw: torch.Tensor  # [num_blocks, Hkv, block_size, C] uint8
    head_dim: int
    group_size: int
    fraction: float
    low: QuantKVFormat = field(init=False)
    pool: torch.Tensor = field(init=False)  # [num_blocks, Hkv, slots, S] uint8
    offsets: torch.Tensor = field(init=False)  # [num_blocks, Hkv, slots] int16 (a view of the pool)
    importance: torch.Tensor = field(init=False)  # [num_blocks, Hkv, slots] float16 (a view of the pool)

    packed = True
    mixed = True
    k4 = None
    v4 = None
    bits = LOW_BITS

    def __post_init__(self) -> None:
        check_params(self.head_dim, LOW_BITS, self.group_size)
        if self.raw.dim() != 4 or self.raw.dtype != torch.uint8 or not self.raw.is_contiguous():
            raise ValueError(f"mixed pages need a contiguous uint8 cache [num_blocks, Hkv, block_size, cell], got "
                             f"{self.raw.dtype} {tuple(self.raw.shape)}")
        nb, hkv, bs, c = self.raw.shape
        r4 = row_bytes(self.head_dim, LOW_BITS, self.group_size)
        slots, s = slot_count(bs, self.fraction), slot_bytes(self.head_dim, self.group_size)
        # A companion cache (head split's streaming heads) shares its parent's cell over a
        # different page length: any cell whose pages hold their int4 rows and slot pool will do.
        if c < 2 * r4 or bs * (c - 2 * r4) < slots * s:
            raise ValueError(f"mixed pages of head_dim {self.head_dim}, group {self.group_size}, fraction "
                             f"{self.fraction}, {bs} tokens per page need a cell of at least "
                             f"{cell_bytes(self.head_dim, self.group_size, bs, self.fraction)} bytes, got {c}")
        if bs > 32767:
            raise ValueError(f"mixed pages index tokens in a page with int16; block_size {bs} is too large")
        flat = self.raw.view(nb, hkv, bs * c)
        low_end = bs * 2 * r4
        pool = flat[..., low_end: low_end + slots * s].view(nb, hkv, slots, s)
        object.__setattr__(self, "low", QuantKVFormat(flat[..., :low_end].view(nb, hkv, bs, 2 * r4), self.head_dim,
                                                      LOW_BITS, self.group_size, rotates_keys(self.head_dim, LOW_BITS),
                                                      strided=True))
        object.__setattr__(self, "pool", pool)
        object.__setattr__(self, "offsets", pool[..., 0:2].view(torch.int16)[..., 0])
        object.__setattr__(self, "importance", pool[..., 2:4].view(torch.float16)[..., 0])

    # -- shape -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"mixed-int4/int8-g{self.group_size}-{self.slots}of{self.block_size}"

    @property
    def rotate_keys(self) -> bool:
        return self.low.rotate_keys

    @property
    def slots(self) -> int:
        return self.pool.shape[2]

    @property
    def side_bytes(self) -> int:
        """Bytes one token of one head takes on one side, its share of the slot pool included."""
        return self.raw.shape[3] // 2

    def _high(self, entries: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot entries ``[..., S]`` -> their int8 keys (un-rotated) and values ``[..., D]``."""
        r8 = row_bytes(self.head_dim, HIGH_BITS, self.group_size)
        k = decode(entries[..., _HEADER: _HEADER + r8], self.head_dim, HIGH_BITS, self.group_size, dtype)
        v = decode(entries[..., _HEADER + r8:], self.head_dim, HIGH_BITS, self.group_size, dtype)
        if dtype == torch.float64 and self.rotate_keys:  # the reference's accessor: an exact H
            k = torch.matmul(k, hadamard(self.head_dim, k.device, torch.float64))
        else:
            k = self.low._unrotate(k)  # the int4 rows' own H, built once
        return k, v

    def rotate_query(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` as a kernel that reads the stored (rotated) keys must see it: ``H q``."""
        return self.low.rotate_query(query)

    # -- reading -----------------------------------------------------------------------------
    def gather(self, blocks: torch.Tensor, heads: torch.Tensor, dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the cells ``(blocks[i], heads[i])``: ``[*shape, bs, D]``, each token
        from its slot where it holds one, else from its int4 row."""
        shape, bs, d = blocks.shape, self.block_size, self.head_dim
        dtype = dtype or torch.float32
        k, v = self.low.gather(blocks, heads, dtype)
        k, v = k.reshape(-1, bs, d), v.reshape(-1, bs, d)
        cell = blocks.reshape(-1).long() * self.num_kv_heads + heads.reshape(-1).long()
        off = self.offsets.reshape(-1, self.slots).index_select(0, cell)  # [n, slots]
        n_idx, s_idx = (off >= 0).nonzero(as_tuple=True)
        if n_idx.numel():
            entries = self.pool.reshape(-1, self.slots, self.pool.shape[-1])[cell[n_idx], s_idx]  # [m, S]
            hk, hv = self._high(entries, dtype)
            at = n_idx * bs + off[n_idx, s_idx].long()
            k = k.reshape(-1, d).index_copy_(0, at, hk).view(-1, bs, d)
            v = v.reshape(-1, d).index_copy_(0, at, hv).view(-1, bs, d)
        return k.reshape(*shape, bs, d), v.reshape(*shape, bs, d)

    def gather_tokens(self, blocks: torch.Tensor, heads: torch.Tensor, offsets: torch.Tensor,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of single tokens ``(blocks[i], heads[i], offsets[i])``: ``[*shape, D]``."""
        dtype = dtype or torch.float32
        k, v = self.low.gather_tokens(blocks, heads, offsets, dtype)
        b, h = blocks.long(), heads.long()
        hit = self.offsets[b, h] == offsets.to(torch.int16)[..., None]  # [*shape, slots]
        where = hit.nonzero(as_tuple=False)  # [m, ndim + 1]: the token's index, then its slot
        if where.shape[0]:
            tok = tuple(where[:, :-1].unbind(1))
            entries = self.pool[b[tok], h[tok], where[:, -1]]
            hk, hv = self._high(entries, dtype)
            k[tok], v[tok] = hk, hv  # fresh tensors: the int4 rows decoded
        return k, v

    def token(self, block: int, head: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's key and value ``[D]`` in float64 (the reference's accessor)."""
        for s in range(self.slots):
            if int(self.offsets[block, head, s]) == offset:
                return self._high(self.pool[block, head, s], torch.float64)
        return self.low.token(block, head, offset)

    def holds_high(self, block: int, head: int, offset: int) -> bool:
        return bool((self.offsets[block, head] == offset).any())

    # -- writing -----------------------------------------------------------------------------
    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """int4 rows for ``key``/``value`` ``[T, Hkv, D]`` at ``slot = block * block_size + offset``
        (negative: skipped), and every slot at or past the lowest offset written in a page freed."""
        slots = slot_mapping[: key.shape[0]].long()
        self.low.write(key, value, slots)
        slots = slots[slots >= 0]
        if slots.numel() == 0:
            return
        blocks, offs = slots // self.block_size, slots % self.block_size
        pages, inv = torch.unique(blocks, return_inverse=True)
        first = torch.full((pages.shape[0],), self.block_size, dtype=torch.long, device=slots.device)
        first.scatter_reduce_(0, inv, offs, "amin")
        held = self.offsets[pages]  # [U, Hkv, slots]
        self.offsets[pages] = held.masked_fill(held.long() >= first[:, None, None], -1)

    def promote(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                importance: torch.Tensor) -> None:
        """Give this step's tokens (already written) high-precision slots by ``importance``
        ``[T, Hkv]``: per page and KV head, the top ``slots`` of the tokens held and the new ones."""
        t = key.shape[0]
        slots = slot_mapping[:t].long()
        keep = slots >= 0
        if not bool(keep.any()):
            return
        rows = keep.nonzero(as_tuple=True)[0]
        slots, imp = slots[rows], importance[rows].float()
        bs, hkv, n_slots, dev = self.block_size, self.num_kv_heads, self.slots, self.device
        blocks, offs = slots // bs, slots % bs
        pages, inv = torch.unique(blocks, return_inverse=True)
        u = pages.shape[0]
        old = self.pool[pages]  # [U, Hkv, slots, S] (a copy)
        old_off = self.offsets[pages].long()
        old_imp = self.importance[pages].float()
        # Candidates by in-page offset: importance, and where each one's bytes come from
        # (0..slots-1: an old slot; slots + i: the i-th new token).
        cand = torch.full((u, hkv, bs), float("-inf"), device=dev)
        source = torch.full((u, hkv, bs), -1, dtype=torch.long, device=dev)
        uu, hh, ss = (old_off >= 0).nonzero(as_tuple=True)
        cand[uu, hh, old_off[uu, hh, ss]] = old_imp[uu, hh, ss]
        source[uu, hh, old_off[uu, hh, ss]] = ss
        heads = torch.arange(hkv, device=dev)
        tok = torch.arange(rows.shape[0], device=dev)
        cand[inv[:, None], heads[None, :], offs[:, None]] = imp
        source[inv[:, None], heads[None, :], offs[:, None]] = n_slots + tok[:, None]
        order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :n_slots]  # [U, Hkv, slots]
        chosen_imp = cand.gather(-1, order)
        chosen_src = source.gather(-1, order)
        valid = chosen_imp > float("-inf")
        # New tokens' int8 rows, encoded once: [rows, Hkv, S - header].
        stored = torch.matmul(key[rows].float(), self.low._h) if self.rotate_keys else key[rows]
        fresh = torch.cat([encode(stored, HIGH_BITS, self.group_size),
                           encode(value[rows], HIGH_BITS, self.group_size)], -1)
        new = torch.zeros_like(old)
        from_old = valid & (chosen_src < n_slots)
        from_new = valid & (chosen_src >= n_slots)
        u1, h1, j1 = from_old.nonzero(as_tuple=True)
        new[u1, h1, j1] = old[u1, h1, chosen_src[u1, h1, j1]]
        u2, h2, j2 = from_new.nonzero(as_tuple=True)
        new[u2, h2, j2, _HEADER:] = fresh[chosen_src[u2, h2, j2] - n_slots, h2]
        header = torch.stack([order.to(torch.int16).masked_fill(~valid, -1).view(torch.uint8).view(u, hkv, n_slots, 2),
                              chosen_imp.clamp(max=65504.0).masked_fill(chosen_imp == float("inf"), float("inf"))
                              .to(torch.float16).view(torch.uint8).view(u, hkv, n_slots, 2)], -2)
        new[..., :_HEADER] = header.view(u, hkv, n_slots, _HEADER)
        self.pool[pages] = new


def observed_importance(query: torch.Tensor, key: torch.Tensor, plan: BatchPlan, scale: float, sink: int = SINKS,
                        observed: int = OBSERVED) -> torch.Tensor:
    """Importance ``[T, Hkv]`` float32 of this step's new tokens (see the module docstring).

    query ``[T, Hq, D]``, key ``[T, Hkv, D]``: the step's rows in ``plan``'s order."""
    t, hq, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    out = torch.zeros(t, hkv, dtype=torch.float32, device=query.device)  # decode rows: 0
    for b in range(plan.num_seqs):
        s, e = plan.starts[b], plan.starts[b + 1]
        n = e - s
        first = plan.lens[b] - n  # position of the chunk's first token
        if n > 1:
            o = min(observed, n)
            q = query[e - o: e].float().view(o, hkv, group, d)
            k = key[s:e].float()  # [n, Hkv, D]
            logits = torch.einsum("ohgd,nhd->hgon", q, k) * scale  # [Hkv, G, o, n]
            row = torch.arange(n - o, n, device=query.device)
            logits.masked_fill_(torch.arange(n, device=query.device)[None, :] > row[:, None], float("-inf"))
            share = logits.softmax(-1).mean(dim=(1, 2))  # [Hkv, n]
            out[s:e] = share.t() * n
        if first < sink:
            out[s: s + min(n, sink - first)] = float("inf")
    return out


def mixed(kv_cache: torch.Tensor, head_dim: int, group_size: int, fraction: float) -> MixedKVFormat:
    """The mixed view of an engine buffer whose last axis holds a (slot, head) cell's ``C`` bytes,
    in any dtype: reinterpreted as uint8."""
    if kv_cache.dim() != 4 or not kv_cache.is_contiguous():
        raise ValueError(f"a mixed cache must be a contiguous [num_blocks, Hkv, block_size, cell] buffer, "
                         f"got {tuple(kv_cache.shape)}")
    return MixedKVFormat(kv_cache.view(torch.uint8), head_dim, group_size, fraction)
