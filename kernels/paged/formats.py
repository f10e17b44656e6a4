"""Storage formats: how one layer's paged keys and values sit in memory.

A format holds K and V as two **strided views** of the engine's own buffers, so every kernel reads
any engine's cache without a copy. Each view is 6-D,

    [num_blocks, num_kv_heads, T1, T0, J1, J0]   with T1*T0 = block_size and J1*J0 = head_dim,

where token ``t`` of a block is ``(t // T0, t % T0)`` and dimension ``j`` is ``(j // J0, j % J0)``.
Plain row-major pages are the special case ``T1 = J1 = 1``; tiled layouts (the CPU op's AMX
packing) use the extra axes. Whenever the tiles merge (every layout but AMX), ``k4``/``v4`` give the
same data as a 4-D view ``[num_blocks, num_kv_heads, block_size, head_dim]``; the Triton kernel
reads those four strides.

Constructors, one per engine layout:
- ``plain(kv_cache)``: ``[num_blocks, Hkv, block_size, 2*D]``, keys then values per (block, head)
  cell (vLLM's LBHNC shape as lcx itself writes it);
- ``vllm_cpu(kv_cache, isa)``: the same buffer as vLLM's CPU op packs it per ISA;
- ``nhd(k_cache, v_cache)``: ``[num_blocks, block_size, Hkv, D]`` each (vLLM's CUDA layout);
- ``token_pool(k_buf, v_buf, page_size)``: ``[tokens, Hkv, D]`` each (SGLang's MHA pool).

Quantized pages (int8/int4 with scales) extend this descriptor with ``bits``, ``group_size`` and
scale views; ``bits`` is 16 or 32 (the cache's own floating dtype) today.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import torch


def _tiled(base: torch.Tensor, num_blocks: int, num_kv_heads: int, cell_strides: tuple[int, int],
           offset: int, tiles: tuple[int, int, int, int], tile_strides: tuple[int, int, int, int]) -> torch.Tensor:
    return base.as_strided((num_blocks, num_kv_heads, *tiles), (*cell_strides, *tile_strides),
                           base.storage_offset() + offset)


@dataclass(frozen=True)
class KVFormat:
    """One layer's paged K and V (see the module docstring for the axes).

    cells: for layouts that keep a (block, head)'s keys and values in one contiguous cell
    (``[num_blocks, Hkv, cell_elems]``, a view), so that a gather copies whole cells with one
    ``index_select``; None otherwise. ``k``/``v`` then start ``k_offset``/``v_offset`` elements into
    each cell.
    """

    name: str
    k: torch.Tensor  # [num_blocks, Hkv, T1, T0, J1, J0]
    v: torch.Tensor  # [num_blocks, Hkv, T1, T0, J1, J0] (its own tiling)
    bits: int = 0  # bits per stored element; 0: the views' own (16 or 32, unquantized)
    cells: torch.Tensor | None = None
    k_offset: int = 0
    v_offset: int = 0

    #: Elements as the views hold them (``quant.QuantKVFormat`` packs codes and scales instead).
    packed = False

    def __post_init__(self) -> None:
        for side, t in (("k", self.k), ("v", self.v)):
            if t.dim() != 6:
                raise ValueError(f"KVFormat {self.name}: {side} must be a 6-D tiled view, got {tuple(t.shape)}")
        if (self.k.shape[0], self.k.shape[1]) != (self.v.shape[0], self.v.shape[1]):
            raise ValueError(f"KVFormat {self.name}: k and v disagree on blocks/heads: "
                             f"{tuple(self.k.shape)} vs {tuple(self.v.shape)}")
        if (self.block_size, self.head_dim) != (self.v.shape[2] * self.v.shape[3], self.v.shape[4] * self.v.shape[5]):
            raise ValueError(f"KVFormat {self.name}: k and v tiles cover different pages")
        native = self.k.element_size() * 8
        if self.bits == 0:
            object.__setattr__(self, "bits", native)
        elif self.bits != native:
            raise ValueError(f"KVFormat {self.name}: bits={self.bits} but the views hold {native}-bit elements; "
                             "packed (quantized) pages need their own format with scales")

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2] * self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4] * self.k.shape[5]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def side_bytes(self) -> int:
        """Bytes one token of one head takes on one side (keys or values)."""
        return self.head_dim * self.bits // 8

    @property
    def device(self) -> torch.device:
        return self.k.device

    # -- views ---------------------------------------------------------------------------------
    @staticmethod
    def _as4(t: torch.Tensor) -> torch.Tensor | None:
        """``[nb, Hkv, bs, D]`` as a view, or None when the tiles do not merge."""
        nb, h, t1, t0, j1, j0 = t.shape
        s = t.stride()
        tok_ok = t1 == 1 or t0 == 1 or s[2] == s[3] * t0
        dim_ok = j1 == 1 or j0 == 1 or s[4] == s[5] * j0
        if not (tok_ok and dim_ok):
            return None
        tok_stride = s[3] if t0 > 1 else s[2]
        dim_stride = s[5] if j0 > 1 else s[4]
        return t.as_strided((nb, h, t1 * t0, j1 * j0), (s[0], s[1], tok_stride, dim_stride))

    @property
    def k4(self) -> torch.Tensor | None:
        return self._as4(self.k)

    @property
    def v4(self) -> torch.Tensor | None:
        return self._as4(self.v)

    def gather(self, blocks: torch.Tensor, heads: torch.Tensor, dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the cells ``(blocks[i], heads[i])``: each ``[*blocks.shape, bs, D]``, in
        ``dtype`` (default: the cache's). Reads only those cells, with one gather of whole cells where
        the layout allows; the results may be strided views of that one buffer (keys transposed, for
        instance): use them as they are or copy once."""
        shape = blocks.shape
        blocks, heads = blocks.reshape(-1).long(), heads.reshape(-1).long()
        n = blocks.shape[0]
        if self.cells is not None:
            e = self.cells.shape[-1]
            raw = self.cells.reshape(-1, e).index_select(0, blocks * self.num_kv_heads + heads)  # [n, cell]
            if dtype is not None and dtype != raw.dtype:
                raw = raw.to(dtype)  # one contiguous pass; converting strided views later is far slower
            out = []
            for view, off in ((self.k, self.k_offset), (self.v, self.v_offset)):
                tiles = raw.as_strided((n, *view.shape[2:]), (e, *view.stride()[2:]), off)
                x = self._as4(tiles[:, None])  # [n, 1, bs, D] when the tiles merge
                out.append(x[:, 0] if x is not None else tiles.reshape(n, self.block_size, self.head_dim))
            k, v = out
        else:
            k = self.k[blocks, heads].reshape(n, self.block_size, self.head_dim)
            v = self.v[blocks, heads].reshape(n, self.block_size, self.head_dim)
            if dtype is not None:
                k, v = k.to(dtype), v.to(dtype)
        return k.reshape(*shape, self.block_size, self.head_dim), v.reshape(*shape, self.block_size, self.head_dim)

    def gather_tokens(self, blocks: torch.Tensor, heads: torch.Tensor, offsets: torch.Tensor,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of single tokens ``(blocks[i], heads[i], offsets[i])``: ``[*shape, D]``.
        A side whose tokens are contiguous rows (``_rows``) is read with one row ``index_select``,
        a plain copy per token; a tiled side (keys transposed, AMX tiles) by element indexing."""
        out = []
        for view, rows in zip((self.k, self.v), self._rows):
            if rows is not None:
                flat, s_block, s_head, s_token, first = rows
                at = blocks.long() * s_block + heads.long() * s_head + offsets.long() * s_token + first
                x = flat.index_select(0, at.reshape(-1)).view(*blocks.shape, self.head_dim)
                out.append(x if dtype is None else x.to(dtype))
                continue
            t0 = view.shape[3]
            x = view[blocks, heads, offsets // t0, offsets % t0]  # [*shape, J1, J0]
            x = x.reshape(*blocks.shape, self.head_dim)
            out.append(x if dtype is None else x.to(dtype))
        return out[0], out[1]

    @functools.cached_property
    def _rows(self) -> tuple[tuple | None, tuple | None]:
        """Per side (keys, values): where each token's ``D`` elements form one contiguous row at a
        whole-row offset, the storage as ``[rows, D]`` and the block, head and token strides and
        the first row, in rows; None for a side whose tokens are tiled or transposed."""
        sides = []
        for view in (self.k, self.v):
            x = self._as4(view)
            d = self.head_dim
            if x is None or (x.stride(3) != 1 and d > 1):
                sides.append(None)
                continue
            s_block, s_head, s_token = x.stride(0), x.stride(1), x.stride(2)
            if any(n % d for n in (s_block, s_head, s_token, x.storage_offset())):
                sides.append(None)
                continue
            elems = x.untyped_storage().nbytes() // x.element_size()
            flat = x.as_strided((elems // d, d), (d, 1), 0)
            sides.append((flat, s_block // d, s_head // d, s_token // d, x.storage_offset() // d))
        return sides[0], sides[1]

    def token(self, block: int, head: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's key and value, ``[D]`` each (the reference's slow, obvious accessor)."""
        t0k, t0v = self.k.shape[3], self.v.shape[3]
        k = self.k[block, head, offset // t0k, offset % t0k].reshape(-1)
        v = self.v[block, head, offset // t0v, offset % t0v].reshape(-1)
        return k, v

    # -- writing -------------------------------------------------------------------------------
    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[T, Hkv, D]`` at ``slot = block * block_size + offset``;
        negative slots (padding) are skipped. Follows the format's own tiling."""
        slots = slot_mapping[: key.shape[0]].long()
        if bool((slots < 0).any()):
            keep = slots >= 0
            slots, key, value = slots[keep], key[keep], value[keep]
        bs = self.block_size
        blocks, offsets = slots // bs, slots % bs
        for view, x in ((self.k, key), (self.v, value)):
            t0, j1, j0 = view.shape[3], view.shape[4], view.shape[5]
            # Advanced indices around a slice put the token axis first: [T, Hkv, J1, J0].
            view[blocks, :, offsets // t0, offsets % t0] = x.reshape(x.shape[0], x.shape[1], j1, j0).to(view.dtype)


# ----------------------------------------------------------------------------- constructors

def _lbhnc_cells(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(f"kv_cache must be [num_blocks, num_kv_heads, block_size, 2*head_dim], "
                         f"got shape {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    nb, hkv, bs, two_d = kv_cache.shape
    return nb, hkv, bs, two_d // 2


def plain(kv_cache: torch.Tensor) -> KVFormat:
    """``[nb, Hkv, bs, 2D]``: per (block, head) cell a key plane ``[bs, D]`` then a value plane."""
    nb, hkv, bs, d = _lbhnc_cells(kv_cache)
    cell = (hkv * 2 * bs * d, 2 * bs * d)
    k = _tiled(kv_cache, nb, hkv, cell, 0, (1, bs, 1, d), (0, d, 0, 1))
    v = _tiled(kv_cache, nb, hkv, cell, bs * d, (1, bs, 1, d), (0, d, 0, 1))
    return KVFormat("plain", k, v, cells=kv_cache.view(nb, hkv, 2 * bs * d), v_offset=bs * d)


# vLLM's CPU op packs each (block, head) cell per ISA. Probed from its own writer
# (ops.cpu_attn_reshape_and_cache) and checked against it in tests/kernels/test_formats_engine.py:
#   vec / vec16 (and neon etc.): keys transposed [D, bs]; values plain [bs, D].
#   amx (bf16): keys in 16-token tiles of dimension pairs [bs/16][D/2][16][2];
#               values in token pairs of 16-wide dimension slabs [D/16][bs/2][16][2].
_AMX_TILE = 16


def vllm_cpu(kv_cache: torch.Tensor, isa: str) -> KVFormat:
    """vLLM's CPU paged-attention cache, as packed by its writer for ``isa``."""
    nb, hkv, bs, d = _lbhnc_cells(kv_cache)
    cell = (hkv * 2 * bs * d, 2 * bs * d)
    if isa == "amx":
        if bs % _AMX_TILE or d % _AMX_TILE or kv_cache.element_size() != 2:
            raise ValueError(f"amx packing needs a 16-bit cache and block_size, head_dim multiples of 16; "
                             f"got {kv_cache.dtype}, block_size={bs}, head_dim={d}")
        k = _tiled(kv_cache, nb, hkv, cell, 0, (bs // _AMX_TILE, _AMX_TILE, d // 2, 2), (_AMX_TILE * d, 2, 2 * _AMX_TILE, 1))
        v = _tiled(kv_cache, nb, hkv, cell, bs * d, (bs // 2, 2, d // _AMX_TILE, _AMX_TILE), (2 * _AMX_TILE, 1, bs * _AMX_TILE, 2))
        return KVFormat("vllm-cpu-amx", k, v, cells=kv_cache.view(nb, hkv, 2 * bs * d), v_offset=bs * d)
    k = _tiled(kv_cache, nb, hkv, cell, 0, (1, bs, d, 1), (0, 1, bs, 0))
    v = _tiled(kv_cache, nb, hkv, cell, bs * d, (1, bs, 1, d), (0, d, 0, 1))
    return KVFormat(f"vllm-cpu-{isa}", k, v, cells=kv_cache.view(nb, hkv, 2 * bs * d), v_offset=bs * d)


def nhd(k_cache: torch.Tensor, v_cache: torch.Tensor) -> KVFormat:
    """``[nb, bs, Hkv, D]`` key and value caches (any strides, e.g. halves of ``[2, nb, bs, Hkv, D]``)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"nhd caches must both be [num_blocks, block_size, Hkv, D]; got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    views = []
    for c in (k_cache, v_cache):
        nb, bs, hkv, d = c.shape
        s = c.stride()
        views.append(c.as_strided((nb, hkv, 1, bs, 1, d), (s[0], s[2], 0, s[1], 0, s[3])))
    return KVFormat("nhd", *views)


def token_pool(k_buf: torch.Tensor, v_buf: torch.Tensor, page_size: int) -> KVFormat:
    """``[tokens, Hkv, D]`` buffers where page ``p`` is slots ``[p*page_size, (p+1)*page_size)``."""
    if k_buf.dim() != 3 or k_buf.shape != v_buf.shape:
        raise ValueError(f"token pool buffers must both be [tokens, Hkv, D]; got "
                         f"{tuple(k_buf.shape)} and {tuple(v_buf.shape)}")
    if page_size < 1 or k_buf.shape[0] % page_size:
        raise ValueError(f"token pool of {k_buf.shape[0]} slots is not a whole number of pages of {page_size}")
    views = []
    for c in (k_buf, v_buf):
        n, hkv, d = c.shape
        s = c.stride()
        views.append(c.as_strided((n // page_size, hkv, 1, page_size, 1, d),
                                  (s[0] * page_size, s[1], 0, s[0], 0, s[2])))
    return KVFormat("token-pool", *views)
