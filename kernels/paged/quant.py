"""Quantized pages: int8 and int4 keys and values with per-token, per-group scales and zero points.

One layer's cache is a byte buffer ``[num_blocks, Hkv, block_size, 2 * R]`` (uint8): per (block,
head) cell a key plane ``[block_size, R]`` then a value plane ``[block_size, R]``, the same cell
layout as ``formats.plain`` with a token's row of ``D`` elements replaced by ``R`` bytes:

    [ codes: ceil(D * bits / 8) bytes | pad to an even offset | per group: scale, zero (bf16 each) ]

Each token row of each head is split into groups of ``group_size`` channels (the last one may be
shorter). A group with minimum ``lo`` and maximum ``hi`` stores ``zero <= lo`` and
``scale >= (hi - zero) / (2**bits - 1)`` (both rounded outward to bfloat16, whose range covers any
activation) and codes ``q = round((x - zero) / scale)`` in ``[0, 2**bits - 1]``; it reads back as
``zero + q * scale``. So every element's round-trip error is at most ``scale / 2`` of its group:
the analytic bound the tests hold each format to. int4 packs two codes per byte, the even channel
in the low nibble.

Why per token and not per channel (KIVI quantizes keys per channel): a page fills one token at a
time during decode, and a per-channel scale over a page would have to be re-fit, and every earlier
code re-quantized, as each token arrives. Per-token groups are written once and never touched
again, which is what a paged cache shared by prefix caching and preemption needs.
``bench/kv_quant.py`` measures both on real keys.

**Key rotation** (``rotate_keys``; on for int4 when the head dim is a power of two): keys are
stored as ``H k`` with ``H`` the orthonormal Sylvester-Hadamard matrix, which spreads a few large
channels over all of them, so a per-token range holds less outlier. ``H`` is symmetric and its own
inverse, so ``q·k = (H q)·(H k)``: readers that return keys (``gather``, ``token``) rotate them
back, and the Triton kernels rotate the query once instead (``rotate_query``). Measured on the
embedded model's keys (``bench/kv_quant.py``): int4 attention-output error 0.21 without, 0.16 with.

Writing quantizes (``write``); reading dequantizes only what a kernel gathers (``gather``,
``gather_tokens``, ``token``): the cache is never expanded into a dense copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu_op

#: Storage formats by name: bits per code (None: the cache's own floating dtype).
BITS = {"auto": None, "int8": 8, "int4": 4}
_META_BYTES = 4  # scale and zero, bf16 each, per group


def hadamard(d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``d x d`` orthonormal Sylvester-Hadamard matrix (``d`` a power of two): symmetric, its own inverse."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head dim, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / d ** 0.5).to(device=device, dtype=dtype)


def rotates_keys(head_dim: int, bits: int) -> bool:
    """The default: int4 pages rotate keys whenever the head dim allows it."""
    return bits == 4 and head_dim >= 2 and not head_dim & (head_dim - 1)


def code_bytes(head_dim: int, bits: int) -> int:
    return -(-head_dim * bits // 8)


def groups(head_dim: int, group_size: int) -> int:
    return -(-head_dim // group_size)


def row_bytes(head_dim: int, bits: int, group_size: int) -> int:
    """Bytes one token of one KV head takes on one side (keys or values), scales included."""
    data = code_bytes(head_dim, bits)
    return data + (data & 1) + _META_BYTES * groups(head_dim, group_size)


def check_params(head_dim: int, bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"quantized pages hold 4- or 8-bit codes, got bits={bits}")
    if not 1 <= group_size:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")


def _outward(x: torch.Tensor, up: bool) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 away from the inside of the group's range: the result is
    >= x when ``up``, <= x otherwise. A nudge of 2**-7 relative before round-to-nearest (whose
    error is at most 2**-9 relative) guarantees the side."""
    nudge = x.abs().mul_(2.0 ** -7).add_(1e-30)
    return x.add(nudge, alpha=1 if up else -1).to(torch.bfloat16)


def encode(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``x`` ``[..., D]`` floating -> ``[..., R]`` uint8 rows (see the module docstring)."""
    d = x.shape[-1]
    check_params(d, bits, group_size)
    ng = groups(d, group_size)
    lead = x.shape[:-1]
    xf = x.float()
    pad = ng * group_size - d
    if pad:  # the last group's missing channels repeat its first one: no effect on its range
        xf = torch.cat([xf, xf[..., (ng - 1) * group_size:][..., :1].expand(*lead, pad)], -1)
    g = xf.view(*lead, ng, group_size)
    lo, hi = torch.aminmax(g, dim=-1)
    zero = _outward(lo, up=False)
    levels = (1 << bits) - 1
    zf = zero.float()
    scale = _outward(hi.sub_(zf).div_(levels), up=True)
    sf = scale.float()[..., None]
    q = (g - zf[..., None]).div_(sf.masked_fill_(sf <= 0, 1.0)).round_().clamp_(0, levels)
    q = q.view(*lead, ng * group_size)[..., :d].to(torch.uint8)
    if bits == 4:
        if d & 1:
            q = torch.cat([q, torch.zeros(*lead, 1, dtype=torch.uint8, device=q.device)], -1)
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    data = q.shape[-1]
    meta = torch.stack([scale, zero], -1).view(*lead, ng * 2).view(torch.uint8)  # [..., ng*4]
    parts = [q, meta]
    if data & 1:
        parts.insert(1, torch.zeros(*lead, 1, dtype=torch.uint8, device=q.device))
    return torch.cat(parts, -1)


def _fields(rows: torch.Tensor, head_dim: int, bits: int, group_size: int,
            work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` ``[..., R]`` uint8 (any strides) -> the codes ``[..., D]`` and each group's (scale,
    zero) ``[..., ng, 2]``, both converted to ``work`` (exact: codes are small integers, scales bf16)."""
    d, ng = head_dim, groups(head_dim, group_size)
    data = code_bytes(d, bits)
    meta_at = data + (data & 1)
    lead = rows.shape[:-1]
    codes = rows[..., :data]
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], -1).reshape(*lead, 2 * data)
    meta = rows[..., meta_at: meta_at + _META_BYTES * ng].contiguous().view(torch.bfloat16).to(work)
    return codes[..., :d].to(work), meta.view(*lead, ng, 2)


def decode(rows: torch.Tensor, head_dim: int, bits: int, group_size: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``rows`` ``[..., R]`` uint8 (any strides) -> ``[..., D]`` in ``dtype`` (computed in float32,
    or float64 when asked for)."""
    d, ng = head_dim, groups(head_dim, group_size)
    lead = rows.shape[:-1]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q, meta = _fields(rows, d, bits, group_size, work)
    pad = ng * group_size - d
    if pad:
        q = torch.cat([q, q.new_zeros(*lead, pad)], -1)
    x = torch.addcmul(meta[..., 1:2], q.view(*lead, ng, group_size), meta[..., 0:1])
    return x.view(*lead, ng * group_size)[..., :d].to(dtype)


@dataclass(frozen=True)
class Codes:
    """Quantized rows as read, not expanded: ``codes`` ``[..., D]`` (the integer codes, exact in
    float32) and each group's ``scale`` and ``zero`` ``[..., ng]`` (float32), so that an element
    is ``zero + codes * scale`` of its group. Attention can run on them directly (``scores``,
    ``weighted_sum``): the scales apply to ``W`` scores, not to ``W x D`` elements."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    @property
    def groups(self) -> int:
        return self.scale.shape[-1]

    def _grouped(self) -> torch.Tensor:
        """``[..., ng, W, group_size]``: the codes by group, zero-padded to whole groups."""
        ng, gs = self.groups, self.group_size
        c = _pad_channels(self.codes, ng * gs)
        return c.view(*c.shape[:-1], ng, gs).transpose(-3, -2)


def _pad_channels(x: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - x.shape[-1]
    return torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], -1) if pad else x


def read_codes(rows: torch.Tensor, head_dim: int, bits: int, group_size: int) -> Codes:
    """``rows`` ``[..., R]`` uint8 (any strides) -> their ``Codes``: one conversion of the codes,
    none of the ``D`` elements scaled (what ``decode`` does, for the kernels that need values)."""
    codes, meta = _fields(rows, head_dim, bits, group_size, torch.float32)
    return Codes(codes, meta[..., 0], meta[..., 1], group_size)


def read_code_pairs(rows: torch.Tensor, head_dim: int, bits: int, group_size: int) -> tuple[Codes, Codes]:
    """Key and value rows side by side, ``[..., 2, R]`` -> their two ``Codes``, converted together
    (views of one buffer each for codes and scales: half the copies of two ``read_codes``)."""
    both = read_codes(rows, head_dim, bits, group_size)
    return tuple(Codes(both.codes.select(-2, i), both.scale.select(-2, i),
                       both.zero.select(-2, i), group_size) for i in (0, 1))


def scores(query: torch.Tensor, keys: Codes) -> torch.Tensor:
    """``query`` ``[..., G, D]`` float32 against keys ``[..., W, D]`` -> ``q . k`` ``[..., G, W]``:
    per group, ``scale * (q . codes) + zero * sum(q)``."""
    if keys.groups == 1:
        dots = torch.matmul(query, keys.codes.transpose(-1, -2))
        return torch.addcmul(dots.mul_(keys.scale[..., 0].unsqueeze(-2)),
                             query.sum(-1, keepdim=True), keys.zero[..., 0].unsqueeze(-2))
    ng, gs = keys.groups, keys.group_size
    q = _pad_channels(query, ng * gs)
    qg = q.view(*q.shape[:-1], ng, gs).transpose(-3, -2)  # [..., ng, G, gs]
    per = torch.matmul(qg, keys._grouped().transpose(-1, -2))  # [..., ng, G, W]
    scaled = (per * keys.scale.transpose(-1, -2).unsqueeze(-2)).sum(-3)
    return scaled + torch.matmul(qg.sum(-1).transpose(-1, -2), keys.zero.transpose(-1, -2))


def weighted_sum(probs: torch.Tensor, values: Codes) -> torch.Tensor:
    """``probs`` ``[..., G, W]`` float32 over values ``[..., W, D]`` -> ``sum_w p_w v_w``
    ``[..., G, D]``: per group, ``(p * scale) @ codes + p @ zero``."""
    d = values.codes.shape[-1]
    if values.groups == 1:
        out = torch.matmul(probs * values.scale[..., 0].unsqueeze(-2), values.codes)
        return out.add_((probs * values.zero[..., 0].unsqueeze(-2)).sum(-1, keepdim=True))  # no second GEMM
    ng, gs = values.groups, values.group_size
    weighted = probs.unsqueeze(-3) * values.scale.transpose(-1, -2).unsqueeze(-2)  # [..., ng, G, W]
    out = torch.matmul(weighted, values._grouped())  # [..., ng, G, gs]
    out = out + torch.matmul(probs, values.zero).transpose(-1, -2).unsqueeze(-1)
    return out.transpose(-3, -2).reshape(*probs.shape[:-1], ng * gs)[..., :d]


def error_bound(rows: torch.Tensor, head_dim: int, bits: int, group_size: int) -> torch.Tensor:
    """Per element, the analytic round-trip bound ``scale / 2`` of its group: ``[..., D]`` float32."""
    ng = groups(head_dim, group_size)
    data = code_bytes(head_dim, bits)
    meta_at = data + (data & 1)
    meta = rows[..., meta_at: meta_at + _META_BYTES * ng].contiguous().view(torch.bfloat16).float()
    scale = meta.view(*rows.shape[:-1], ng, 2)[..., 0]
    return (scale / 2).repeat_interleave(group_size, -1)[..., :head_dim]


class BytePages:
    """The shape of a byte cache ``raw`` ``[num_blocks, Hkv, block_size, cell bytes]`` (uint8), as
    every format describes itself to the kernels."""

    raw: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.raw.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.raw.shape[1]

    @property
    def block_size(self) -> int:
        return self.raw.shape[2]

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8


@dataclass(frozen=True)
class QuantKVFormat(BytePages):
    """One layer's quantized pages, over the engine's byte buffer (a view, never a copy).

    Offers what the kernels read through (``gather``, ``gather_tokens``, ``token``, ``write``) with
    the same meaning as ``KVFormat``'s, returning dequantized values. ``k4``/``v4`` are None: no
    kernel may read these pages as plain elements."""

    raw: torch.Tensor  # [num_blocks, Hkv, block_size, 2 * R] uint8
    head_dim: int
    bits: int
    group_size: int
    rotate_keys: bool = False
    #: Rows need not fill their cells (``mixed`` keeps a slot pool after them): only each row must
    #: be contiguous and the (block, head) axes mergeable.
    strided: bool = False

    packed = True
    mixed = False
    k4 = None
    v4 = None

    def __post_init__(self) -> None:
        check_params(self.head_dim, self.bits, self.group_size)
        if self.rotate_keys:
            object.__setattr__(self, "_h", hadamard(self.head_dim, self.raw.device))
        r = row_bytes(self.head_dim, self.bits, self.group_size)
        if self.raw.dim() != 4 or self.raw.dtype != torch.uint8 or self.raw.shape[-1] != 2 * r:
            raise ValueError(f"int{self.bits} pages of head_dim {self.head_dim}, group {self.group_size} need a uint8 "
                             f"cache [num_blocks, Hkv, block_size, {2 * r}], got {self.raw.dtype} {tuple(self.raw.shape)}")
        s = self.raw.stride()
        n = self.raw.shape
        rows_ok = s[3] == 1 and (n[2] == 1 or s[2] == n[3]) and (n[1] == 1 or s[0] == s[1] * n[1])
        if not (self.raw.is_contiguous() or (self.strided and rows_ok)):
            raise ValueError("the quantized cache must be contiguous")

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}" + ("-rot" if self.rotate_keys else "")

    def _unrotate(self, k: torch.Tensor) -> torch.Tensor:
        return torch.matmul(k, self._h.to(k.dtype)) if self.rotate_keys else k

    def rotate_query(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` as a kernel that reads the stored (rotated) keys must see it: ``H q``."""
        return torch.matmul(query.float(), self._h).to(query.dtype) if self.rotate_keys else query

    @property
    def row_bytes(self) -> int:
        return self.raw.shape[-1] // 2

    @property
    def side_bytes(self) -> int:
        """Bytes one token of one head takes on one side (keys or values), scales included."""
        return self.row_bytes


    def _decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return decode(rows, self.head_dim, self.bits, self.group_size, dtype)

    def gather(self, blocks: torch.Tensor, heads: torch.Tensor, dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values of the cells ``(blocks[i], heads[i])``: ``[*shape, bs, D]``."""
        shape = blocks.shape
        nb, hkv, bs, two_r = self.raw.shape
        idx = blocks.reshape(-1).long() * hkv + heads.reshape(-1).long()
        cells = self.raw.view(nb * hkv, bs, two_r).index_select(0, idx)  # [n, bs, 2R]
        r = two_r // 2
        dtype = dtype or torch.float32
        k = self._unrotate(self._decode(cells[..., :r], dtype))
        v = self._decode(cells[..., r:], dtype)
        return k.reshape(*shape, bs, self.head_dim), v.reshape(*shape, bs, self.head_dim)

    def gather_cell_codes(self, blocks: torch.Tensor, heads: torch.Tensor) -> tuple[Codes, Codes]:
        """Keys and values of whole cells ``(blocks[i], heads[i])`` as ``Codes`` ``[*shape, bs, D]``
        (one gather of whole cells; keys stay rotated, as ``gather_token_codes``)."""
        nb, hkv, bs, two_r = self.raw.shape
        idx = blocks.reshape(-1).long() * hkv + heads.reshape(-1).long()
        cells = self.raw.view(nb * hkv, bs, two_r).index_select(0, idx).view(*blocks.shape, bs, 2, two_r // 2)
        return read_code_pairs(cells, self.head_dim, self.bits, self.group_size)

    def _token_rows(self, blocks: torch.Tensor, heads: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The raw key-and-value rows of single tokens: ``[*shape, 2, R]`` uint8."""
        if self.raw.is_contiguous():  # one row copy per token, not element indexing
            nb, hkv, bs, two_r = self.raw.shape
            at = (blocks.long() * hkv + heads.long()) * bs + offsets.long()
            rows = self.raw.view(-1, two_r).index_select(0, at.reshape(-1)).view(*blocks.shape, two_r)
        else:
            rows = self.raw[blocks.long(), heads.long(), offsets.long()]  # [*shape, 2R]
        return rows.view(*rows.shape[:-1], 2, self.row_bytes)

    def gather_tokens(self, blocks: torch.Tensor, heads: torch.Tensor, offsets: torch.Tensor,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values of single tokens ``(blocks[i], heads[i], offsets[i])``: ``[*shape, D]``."""
        both = self._decode(self._token_rows(blocks, heads, offsets), dtype or torch.float32)  # K and V in one pass
        return self._unrotate(both[..., 0, :]), both[..., 1, :]

    def gather_token_codes(self, blocks: torch.Tensor, heads: torch.Tensor, offsets: torch.Tensor
                           ) -> tuple[Codes, Codes]:
        """Keys and values of single tokens as ``Codes``, not expanded. Keys stay rotated when
        ``rotate_keys``: score them against ``rotate_query(query)``."""
        return read_code_pairs(self._token_rows(blocks, heads, offsets), self.head_dim, self.bits, self.group_size)

    def token(self, block: int, head: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's key and value ``[D]``, dequantized in float64 (the reference's accessor)."""
        row, r = self.raw[block, head, offset], self.row_bytes
        k = self._decode(row[:r], torch.float64)
        if self.rotate_keys:
            k = hadamard(self.head_dim, dtype=torch.float64) @ k
        return k, self._decode(row[r:], torch.float64)

    def encode_rows(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Keys and values ``[T, H, D]`` as this format's rows ``[T, H, 2R]`` (keys rotated when
        ``rotate_keys``), for ``write(..., rows=)``: storage that keeps a layer's heads apart in
        two caches of one format quantizes once."""
        if self.rotate_keys:
            key = torch.matmul(key.float(), self._h)
        both = encode(torch.stack([key, value]), self.bits, self.group_size)  # one pass for K and V
        return torch.cat([both[0], both[1]], -1)

    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:
        """Quantize ``key``/``value`` ``[T, Hkv, D]`` into ``slot = block * block_size + offset``;
        negative slots (padding) are skipped. ``rows``: the same already encoded (``encode_rows``)."""
        if rows is None and cpu_op.serves(self, key):  # quantized where the rows land, in one native call
            cpu_op.encode_write(self, torch.matmul(key.float(), self._h) if self.rotate_keys else key, value,
                                slot_mapping)
            return
        if rows is None:
            rows = self.encode_rows(key, value)
        slots = slot_mapping[: rows.shape[0]].long()
        if bool((slots < 0).any()):
            keep = slots >= 0
            slots, rows = slots[keep], rows[keep]
        bs = self.block_size
        self.raw[slots // bs, :, slots % bs] = rows  # [T, Hkv, 2R]


def round_trip(key: torch.Tensor, value: torch.Tensor, bits: int, group_size: int, rotate_keys: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[..., D]`` as quantized pages of this format read them back (float32)."""
    d = key.shape[-1]
    if rotate_keys:
        h = hadamard(d, key.device)
        k = decode(encode(torch.matmul(key.float(), h), bits, group_size), d, bits, group_size) @ h
    else:
        k = decode(encode(key, bits, group_size), d, bits, group_size)
    return k, decode(encode(value, bits, group_size), d, bits, group_size)


def quantized(kv_cache: torch.Tensor, head_dim: int, bits: int, group_size: int,
              rotate_keys: bool = False) -> QuantKVFormat:
    """The quantized view of an engine buffer whose last axis holds a (slot, head) cell's ``2 * R``
    bytes, in any dtype (vLLM hands the buffer over in the model's dtype): reinterpreted as uint8."""
    if kv_cache.dim() != 4 or not kv_cache.is_contiguous():
        raise ValueError(f"a quantized cache must be a contiguous [num_blocks, Hkv, block_size, cell] buffer, "
                         f"got {tuple(kv_cache.shape)}")
    return QuantKVFormat(kv_cache.view(torch.uint8), head_dim, bits, group_size, rotate_keys)
