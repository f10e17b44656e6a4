"""Torch twin of the paged attention kernel: the CPU path.

Works sequence by sequence. For each sequence it decides, per KV head, which **pages** hold a
candidate key, gathers only those cells from the cache (one gather for all heads, in the
storage format's own layout, so any engine's packing is read where it lies), builds the exact
token mask the selection defines, and computes attention in float32. So the cost follows what is
selected: a decode step over sinks + a window reads sinks + window, never the whole context. A
long prefill under a selection is cut into row tiles, each gathering only its own band of pages.
A decode-only step gathers exactly its rows' candidate tokens (sinks, window, the listed pages or
positions), the whole batch in one gather and two batched products (``_decode_batch``), so a top-k
of scattered tokens costs k tokens, not every page they touch, and the batch pays the index work
once, not once per sequence; a decode row in a step that also runs a prompt chunk takes the same
tokens row by row (``_token_row``).

**Compacted positions** (``rope`` given): each row's candidates are read as if they sat side by
side, the query right after its window, so no query-key distance exceeds the number of tokens
attended. A candidate at ``p_j`` seen from the row at ``p_i`` is rotated by the number of
non-candidates between them, ``g_ij``. The window is contiguous, so only keys before a row's window
move, and there ``g_ij = u(p_i - window) - u(p_j)`` with ``u(x)`` the positions ``<= x`` that are
neither sinks nor listed (less one where a row without a window does not list itself): the rotation splits into one per row and one per key, two more matmuls
(``_compact_scores``). Pairs with ``g_ij = 0`` keep the plain product, so a selection that moves
nothing is exactly the uncompacted attention.

On the CPU a selected row tile runs torch's fused attention kernel under the tile's mask rather than
building its scores (``_flash_tile``); where pairs move, the moved and the plain pairs are two calls
merged by their log-sum-exps, the same split as ``_compact_scores``. A compacted token tile keeps
its masks in parts (``_Band``: held candidates up to each row's window edge, and the window band)
and builds each over the columns it covers only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_op, quant
from .formats import KVFormat
from .plan import BatchPlan
from .rope import Rope
from .selection import Selection

#: Query rows per tile when a selection limits what each row sees (dense prefill is one tile).
ROW_TILE = 256


def _all_heads(hkv: int, n: int) -> torch.Tensor:
    return torch.arange(hkv)[:, None].expand(hkv, n)


def _dense_sequence(q: torch.Tensor, kv: KVFormat, blocks: torch.Tensor, seq_len: int, scale: float, group: int):
    """Causal attention over the whole context: ``q`` ``[Hq, qlen, D]`` float32 -> ``[qlen, Hq, D]``."""
    hkv, n = kv.num_kv_heads, blocks.shape[0]
    first = int(blocks[0])
    if not kv.packed and (n == 1 or bool((blocks[1:] - blocks[:-1] == 1).all())):
        # A contiguous run of blocks: one pass lays the cells out [Hkv, n, ...] and upcasts, no gather.
        k = kv.k[first: first + n].transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        v = kv.v[first: first + n].transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    else:
        k, v = kv.gather(blocks[None, :].expand(hkv, n), _all_heads(hkv, n), torch.float32)  # [Hkv, n, bs, D]
        k, v = k.contiguous(), v.contiguous()
    k = k.reshape(hkv, -1, kv.head_dim)[:, :seq_len]
    v = v.reshape(hkv, -1, kv.head_dim)[:, :seq_len]
    qlen = q.shape[1]
    if 1 < qlen < seq_len and _FLASH_WITH_LSE is not None and q.device.type == "cpu":
        return _chunk_after_context(q, k, v, seq_len - qlen, scale, group)
    mask = None
    if 1 < qlen < seq_len:  # a chunk after earlier context: causal relative to its own positions
        q_pos = torch.arange(seq_len - qlen, seq_len)
        mask = (torch.arange(seq_len)[None, :] <= q_pos[:, None])[None, None]
    # 4-D [1, heads, tokens, D]: with a batch axis SDPA takes its fused CPU kernels for GQA.
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=qlen == seq_len > 1,
                                       scale=scale, enable_gqa=group > 1)[0]
    return o.transpose(0, 1)


#: torch's fused CPU attention, which also returns each row's log-sum-exp (absent, or off the CPU: the masked path).
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _chunk_after_context(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int, scale: float, group: int):
    """A prompt chunk after ``cached`` tokens of context, ``q`` ``[Hq, qlen, D]``, ``k``/``v``
    ``[Hkv, cached + qlen, D]`` -> ``[qlen, Hq, D]``: every row reads all of the context unmasked,
    and the chunk's own keys causally (a square, top-left causal block); the two softmaxes are
    merged by their log-sum-exps. The same keys and weights as one call under the ``[qlen, seq_len]``
    mask, which makes torch's kernel visit the masked blocks too (measured 1.8x slower on a 2.9k
    chunk after 4k tokens) and build the mask first."""
    if group > 1:
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    q4 = q[None].contiguous()
    o_ctx, lse_ctx = _FLASH_WITH_LSE(q4, k[None, :, :cached], v[None, :, :cached], 0.0, False, scale=scale)
    o_own, lse_own = _FLASH_WITH_LSE(q4, k[None, :, cached:], v[None, :, cached:], 0.0, True, scale=scale)
    top = torch.maximum(lse_ctx, lse_own)
    w_ctx, w_own = (lse_ctx - top).exp_()[..., None], (lse_own - top).exp_()[..., None]
    o = (o_ctx * w_ctx + o_own * w_own) / (w_ctx + w_own)
    return o[0].transpose(0, 1)


def _listed_pages(sel: Selection, b: int, qbs: range, n_pages: int, bs: int) -> torch.Tensor:
    """``[Hkv, n_pages]`` bool: pages holding a listed candidate of any of the query blocks ``qbs``."""
    hkv = sel.counts.shape[1]
    mask = torch.zeros(hkv, n_pages + 1, dtype=torch.bool)  # last column: a sink for padding
    for qb in qbs:
        idx = sel.indices[b, :, qb].long().cpu()
        live = torch.arange(idx.shape[1])[None, :] < sel.counts[b, :, qb].cpu()[:, None]
        pages = idx if sel.granularity == "page" else idx // bs
        mask.scatter_(1, torch.where(live & (pages >= 0) & (pages < n_pages), pages, n_pages), True)
    return mask[:, :n_pages]


def _listed_tokens(sel: Selection, b: int, qb: int, pos: torch.Tensor, bs: int) -> torch.Tensor:
    """``[Hkv, L]`` bool: which gathered positions ``pos`` (``[Hkv, L]``) query block ``qb`` lists."""
    idx = sel.indices[b, :, qb].long().cpu()
    if idx.shape[1] == 0:
        return torch.zeros_like(pos, dtype=torch.bool)
    live = torch.arange(idx.shape[1])[None, :] < sel.counts[b, :, qb].cpu()[:, None]
    units = pos // bs if sel.granularity == "page" else pos
    # Lists are ascending in their live prefix; a sentinel past any unit keeps the whole row sorted.
    idx = torch.where(live, idx, torch.iinfo(torch.int64).max)
    at = torch.searchsorted(idx, units.contiguous()).clamp(max=idx.shape[1] - 1)
    return idx.gather(1, at) == units


def _row_mask(pos: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, window: torch.Tensor,
              listed: torch.Tensor) -> torch.Tensor:
    """``[Hkv, rows, L]`` bool: row ``q_pos[i]`` of KV head ``h`` reads gathered position ``pos[h, j]``
    when it is a sink, inside the row's window band or ``listed`` (``[Hkv, rows or 1, L]``), and not
    after the row."""
    key, row = pos[:, None, :], q_pos[None, :, None]
    keep = (key < sink[:, None, None]) | (key > row - window[:, None, None]) | listed
    return keep & (key <= row)


@dataclass
class _Tile:
    """Index work for one row tile of one sequence under a selection: which cells to gather and the
    exact mask over them. Independent of the layer, so computed once per selection and batch."""

    start: int  # first query row of the tile, relative to the sequence
    rows: int
    blocks: torch.Tensor  # [Hkv, n_sel] physical blocks to gather (padding repeats a real page)
    mask: torch.Tensor | None  # [Hkv, rows, n_sel * bs] bool; None: nothing selected
    tail: torch.Tensor | None  # [Hkv, n_sel * bs] bool: gathered slots past the sequence's end
    every_row_sees_one: bool = False  # every (head, row) of the mask has a candidate
    # Compacted positions (``_compaction``): pairs that move, and the row and key rotations.
    far: torch.Tensor | None = None  # [Hkv, rows, L] bool
    row_shift: torch.Tensor | None = None  # [Hkv, rows] int64: u(p_i - window)
    key_shift: torch.Tensor | None = None  # [Hkv, L] int64: u(p_j)
    # A token tile (``_prepare_token_tile``): ``blocks`` and ``offsets`` ``[Hkv, L]`` place each
    # candidate token; None: ``blocks`` lists whole pages.
    offsets: torch.Tensor | None = None
    # What ``_compact_scores`` needs of ``far``, found once with it (``compacted``): whether any
    # pair moves, the columns ``[0, far_end)`` that may move and ``[plain_start, L)`` that may stay.
    moves: bool = False
    far_end: int = 0
    plain_start: int = 0

    # A compacted token tile whose every head has a window (``_prepare_token_tile``): its masks are
    # not built here but from these parts where they are read (``_flash_tile``); ``mask`` is None.
    band: "_Band | None" = None

    def compacted(self, far: torch.Tensor, row_shift: torch.Tensor, key_shift: torch.Tensor) -> None:
        self.far, self.row_shift, self.key_shift = far, row_shift, key_shift
        moving = far.any(1).any(0).nonzero()
        staying = (self.mask & ~far).any(1).any(0).nonzero()
        self.moves = len(moving) > 0
        self.far_end = int(moving.max()) + 1 if self.moves else 0
        self.plain_start = int(staying.min()) if len(staying) else far.shape[-1]


@dataclass
class _Band:
    """A compacted token tile in parts (every head with a window): row ``i`` reads the held
    candidates (sinks, listed) up to its window's edge moved, ``held[j] & pos[j] <= edge[i]``, and
    its window band plain, ``edge[i] < pos[j] <= q_pos[i]``. The moved pairs are the first
    ``far_end`` columns at most and the plain ones start at column ``near_start`` (candidates are
    ascending), so the two masks are built over those columns only, and nothing of size
    ``[Hkv, rows, L]`` is built when the tile is prepared."""

    pos: torch.Tensor  # [Hkv, L] int64, ascending; padding past every row
    held: torch.Tensor  # [Hkv, L] bool
    q_pos: torch.Tensor  # [rows] int64
    edge: torch.Tensor  # [Hkv, rows] int64: q_pos - window
    held_to_edge: torch.Tensor  # [Hkv, rows] int64: held candidates at or before each row's edge
    near_start: int

    def far_mask(self, end: int) -> torch.Tensor:
        return self.held[:, None, :end] & (self.pos[:, None, :end] <= self.edge[:, :, None])

    def near_mask(self) -> torch.Tensor:
        pos = self.pos[:, None, self.near_start:]
        return (pos > self.edge[:, :, None]) & (pos <= self.q_pos[None, :, None])

    def mask(self) -> torch.Tensor:
        """``[Hkv, rows, L]``: what ``_row_mask`` gives for the tile."""
        pos = self.pos[:, None, :]
        return ((self.held[:, None, :] | (pos > self.edge[:, :, None])) & (pos <= self.q_pos[None, :, None]))


def _banded_token_tile(tile: _Tile, band: _Band, row_shift: torch.Tensor, key_shift: torch.Tensor) -> _Tile:
    """``tile`` (a compacted token tile, every head with a window) completed from ``band``: the
    rotations, and whether and where pairs move, from ``[Hkv, L]`` work alone. The row with the
    furthest edge decides: a held key at or before some row's edge is at or before the last row's,
    and ``u`` only grows along the rows, so a pair moves iff one moves for the last row."""
    last_edge = band.edge[:, -1:]
    far_cols = band.held & (band.pos <= last_edge)  # [Hkv, L]: moved for some row
    tile.row_shift, tile.key_shift, tile.band = row_shift, key_shift, band
    tile.moves = bool((far_cols & (key_shift != row_shift[:, -1:])).any())
    n = band.pos.shape[1]
    at = torch.arange(1, n + 1)
    tile.far_end = int((far_cols * at).max())
    tile.plain_start = band.near_start
    tile.every_row_sees_one = True  # each row reads its own position (a window of at least 1)
    return tile


def _prepare_tile(sel: Selection, b: int, blocks: torch.Tensor, seq_len: int, first_pos: int, rows: range,
                  bs: int, compact: bool = False) -> _Tile:
    hkv = sel.counts.shape[1]
    lo_pos, hi_pos = first_pos + rows.start, first_pos + rows.stop - 1  # positions of the tile's rows
    n_pages = hi_pos // bs + 1
    sink, window, dense = sel.sink[b].cpu().long(), sel.window[b].cpu().long(), sel.dense[b].cpu()
    # Pages with a candidate for some row of the tile, per head.
    page_start = torch.arange(n_pages) * bs
    band_lo = (lo_pos - window + 1).clamp(min=0)
    wanted = (page_start[None, :] < sink[:, None]) | ((page_start[None, :] + bs > band_lo[:, None]) & (window[:, None] > 0))
    wanted |= dense[:, None]
    qbs = range(sel.query_block_of(rows.start), sel.query_block_of(rows.stop - 1) + 1)
    has_lists = sel.indices.shape[3] > 0 and bool((sel.counts[b] > 0).any())
    if has_lists:
        wanted |= _listed_pages(sel, b, qbs, n_pages, bs)
    counts = wanted.sum(1)
    n_sel = int(counts.max())
    if n_sel == 0:
        return _Tile(rows.start, len(rows), blocks[:0], None, None)
    # Selected pages first, ascending (stable sort of the "not wanted" flag); the rest is padding.
    order = torch.argsort((~wanted).to(torch.int8), dim=1, stable=True)[:, :n_sel]  # [Hkv, n_sel]
    pos = (order[:, :, None] * bs + torch.arange(bs)).reshape(hkv, -1)  # [Hkv, L]
    q_pos = torch.arange(lo_pos, hi_pos + 1)
    listed = torch.zeros(hkv, len(rows), pos.shape[1], dtype=torch.bool)
    if has_lists:
        if sel.query_block == 0:
            listed |= _listed_tokens(sel, b, 0, pos, bs)[:, None, :]
        else:
            per_qb = torch.stack([_listed_tokens(sel, b, qb, pos, bs) for qb in qbs], 1)  # [Hkv, nqb, L]
            listed |= per_qb[:, torch.tensor([sel.query_block_of(i) - qbs.start for i in rows])]
    past_end = pos >= seq_len
    live = (torch.arange(n_sel)[None, :] < counts[:, None]).repeat_interleave(bs, 1) & ~past_end
    mask = _row_mask(pos, q_pos, sink, window, listed | dense[:, None, None]) & live[:, None, :]
    tile = _Tile(rows.start, len(rows), blocks[order], mask, past_end if bool(past_end.any()) else None,
                 bool(mask.any(-1).all()))
    if compact:  # one list per tile (tiles never span query blocks here): row 0's is every row's
        held = ((pos < sink[:, None]) | listed[:, 0]) & live  # sinks and listed tokens
        tile.compacted(*_compaction(held, pos, q_pos, window, dense, mask))
    return tile


#: A row tile under token lists gathers its candidate tokens one by one, instead of every page
#: holding one, when they are at most this share of the positions up to its last row: a top-k of
#: 2,048 scattered tokens in a 32k context touches nearly every page, so a page tile would read the
#: whole context for each row tile. Even at 85% of the positions the token tile is the cheaper one
#: (64 rows at 4k under 2,048 listed tokens, sink 64, window 1,024: 34 -> 17 ms; two 8k prompts of
#: the extrapolation benchmark: 177 -> 145 s, the same outputs, against a share of 0.5).
TOKEN_TILE_SHARE = 0.9


def _token_tile_fits(sel: Selection, b: int, hi_pos: int, qb: int, rows: int) -> bool:
    if sel.granularity != "token" or bool(sel.dense[b].any()):
        return False
    most = int((sel.sink[b] + sel.window[b]).max()) + rows + int(sel.counts[b, :, qb].max())
    return most <= TOKEN_TILE_SHARE * (hi_pos + 1)


def _prepare_token_tile(sel: Selection, b: int, blocks: torch.Tensor, first_pos: int, rows: range, bs: int,
                        compact: bool = False) -> _Tile:
    """One row tile (inside one query block) under token lists, no dense head: per KV head its
    sinks, listed tokens up to the tile's last row and the window band of its rows, ascending;
    the mask per row as ``_prepare_tile`` makes it, over exactly those tokens. Built from one
    boolean row per head over the positions up to the tile's last row (a few vector operations
    whatever the list's length)."""
    hkv = sel.counts.shape[1]
    lo_pos, hi_pos = first_pos + rows.start, first_pos + rows.stop - 1
    span = hi_pos + 1
    qb = sel.query_block_of(rows.start)
    sink, window = sel.sink[b].cpu().long(), sel.window[b].cpu().long()
    at = torch.arange(span)
    idx = sel.indices[b, :, qb].long().cpu()  # [Hkv, K]
    ok = (torch.arange(idx.shape[1])[None, :] < sel.counts[b, :, qb].cpu()[:, None]) & (idx >= 0) & (idx < span)
    listed_at = torch.zeros(hkv, span + 1, dtype=torch.bool)  # last column: a dump for dead entries
    listed_at.scatter_(1, torch.where(ok, idx, span), True)
    held_at = listed_at[:, :span] | (at[None, :] < sink[:, None])  # sinks and listed, by position
    band_lo = torch.where(window > 0, (lo_pos - window + 1).clamp(min=0), span)
    chosen = held_at | (at[None, :] >= band_lo[:, None])
    counts = chosen.sum(1)
    width = int(counts.max())
    if width == 0:
        return _Tile(rows.start, len(rows), blocks[:0], None, None)
    slot = torch.where(chosen, chosen.cumsum(1) - 1, width)
    pos = torch.zeros(hkv, width + 1, dtype=torch.int64).scatter_(1, slot, at.expand(hkv, span))[:, :width]
    live = torch.arange(width)[None, :] < counts[:, None]
    pos = torch.where(live, pos, span + torch.arange(width))  # padding: past every row, still ascending
    listed = listed_at.gather(1, pos.clamp(max=span)) & live
    q_pos = torch.arange(lo_pos, hi_pos + 1)
    cells = torch.where(live, pos, 0)
    if compact:
        held = ((pos < sink[:, None]) | listed) & live
        # Held positions up to each row's window edge, counted on the position rows.
        edge = q_pos[None, :] - window[:, None]
        upto = torch.cat([torch.zeros(hkv, 1, dtype=torch.int64), held_at.cumsum(1)], 1)  # [Hkv, span + 1]
        held_to_edge = upto.gather(1, (edge + 1).clamp(min=0, max=span))
        if bool((window > 0).all()):
            # The first column a row reads plain: past the first row's edge (the window band).
            near_start = int((pos <= edge[:, :1]).sum(1).min())
            band = _Band(pos, held, q_pos, edge, held_to_edge, near_start)
            tile = _Tile(rows.start, len(rows), blocks[cells // bs], None, None, offsets=cells % bs)
            return _banded_token_tile(tile, band, edge + 1 - held_to_edge, pos + 1 - held.cumsum(1))
    mask = _row_mask(pos, q_pos, sink, window, listed[:, None, :])
    tile = _Tile(rows.start, len(rows), blocks[cells // bs], mask, None, bool(mask.any(-1).all()), offsets=cells % bs)
    if compact:
        counted = (held_to_edge, held_at.gather(1, q_pos.expand(hkv, -1)))
        tile.compacted(*_compaction(held, pos, q_pos, window, sel.dense[b].cpu(), mask, counted))
    return tile


def _row_tile(sel: Selection, b: int, blocks: torch.Tensor, seq_len: int, first_pos: int, rows: range, bs: int,
              compact: bool) -> _Tile:
    """A token tile where the tile's candidates are few (``TOKEN_TILE_SHARE``), else a page tile."""
    qb = sel.query_block_of(rows.start)
    if qb == sel.query_block_of(rows.stop - 1) and _token_tile_fits(sel, b, first_pos + rows.stop - 1, qb, len(rows)):
        return _prepare_token_tile(sel, b, blocks, first_pos, rows, bs, compact)
    return _prepare_tile(sel, b, blocks, seq_len, first_pos, rows, bs, compact)


#: Tiles whose masks are built together by ``_prepare_tiles`` (bounds its temporaries: 32 tiles of
#: 64 rows over 15 pages of 128 tokens and 3 KV heads is 23 MB of booleans).
TILE_GROUP = 32


def _prepare_tiles(sel: Selection, b: int, blocks: torch.Tensor, seq_len: int, first_pos: int, qlen: int,
                   height: int, bs: int) -> list[_Tile]:
    """Every row tile of one sequence (``height`` rows each, the last one possibly shorter), each
    inside one query block, without compacted positions: the same tiles as ``_prepare_tile``,
    built ``TILE_GROUP`` at a time, so that a long prefill's index work is a few dozen tensor
    operations rather than a few dozen per tile."""
    hkv = sel.counts.shape[1]
    sink, window, dense = sel.sink[b].cpu().long(), sel.window[b].cpu().long(), sel.dense[b].cpu()
    has_lists = sel.indices.shape[3] > 0 and bool((sel.counts[b] > 0).any())
    if has_lists:
        idx_all, cnt_all = sel.indices[b].long().cpu(), sel.counts[b].long().cpu()  # [Hkv, NQB, K], [Hkv, NQB]
    tiles: list[_Tile] = []
    offs = torch.arange(bs)
    for g0 in range(0, qlen, TILE_GROUP * height):
        starts = torch.arange(g0, min(qlen, g0 + TILE_GROUP * height), height)  # [T]
        lo = first_pos + starts
        hi = first_pos + (starts + height).clamp(max=qlen) - 1
        n_pages = hi // bs + 1  # [T]: pages up to each tile's last row
        n_max = int(n_pages.max())
        page = torch.arange(n_max)
        page_start = page * bs
        band_lo = (lo[:, None] - window[None, :] + 1).clamp(min=0)  # [T, Hkv]
        wanted = (page_start[None, None, :] < sink[None, :, None]) | (
            (page_start[None, None, :] + bs > band_lo[:, :, None]) & (window[None, :, None] > 0))
        wanted |= dense[None, :, None]
        exists = page[None, None, :] < n_pages[:, None, None]  # [T, 1, P]
        if has_lists:
            qb = torch.tensor([sel.query_block_of(int(s)) for s in starts])
            idx = idx_all[:, qb].transpose(0, 1)  # [T, Hkv, K]
            live_list = torch.arange(idx.shape[-1]) < cnt_all[:, qb].transpose(0, 1)[..., None]
            pages = idx if sel.granularity == "page" else idx // bs
            listed_page = torch.zeros(len(starts), hkv, n_max + 1, dtype=torch.bool)  # last column: padding
            ok = live_list & (pages >= 0) & (pages < n_pages[:, None, None])
            listed_page.scatter_(2, torch.where(ok, pages, n_max), True)
            wanted |= listed_page[..., :n_max]
        wanted &= exists
        counts = wanted.sum(2)  # [T, Hkv]
        n_sel = counts.amax(1)  # [T]
        width = int(n_sel.max())
        if width == 0:
            tiles += [_Tile(int(s), int(min(height, qlen - s)), blocks[:0], None, None) for s in starts]
            continue
        order = torch.argsort((~wanted).to(torch.int8), dim=2, stable=True)[..., :width]  # [T, Hkv, W]
        pos = (order[..., None] * bs + offs).flatten(2)  # [T, Hkv, L]
        q_pos = lo[:, None] + torch.arange(height)  # [T, rows] (a short last tile's extra rows are cut below)
        past_end = pos >= seq_len
        always = (pos < sink[None, :, None]) | dense[None, :, None]
        if has_lists:
            if sel.granularity == "page":
                always |= listed_page.gather(2, pos // bs)
            else:  # ascending lists, a sentinel past any position keeps each row sorted
                keyed = torch.where(live_list, idx, torch.iinfo(torch.int64).max).flatten(0, 1)
                at = torch.searchsorted(keyed, pos.flatten(0, 1)).clamp(max=keyed.shape[1] - 1)
                always |= (keyed.gather(1, at) == pos.flatten(0, 1)).view_as(pos)
        p4, q4 = pos[:, :, None, :], q_pos[:, None, :, None]
        mask = (p4 > q4 - window[None, :, None, None]) | always[:, :, None, :]
        # No liveness term (``_prepare_tile``'s ``live``): a padding page holds no sink, band or
        # listed position of any row of the tile, and the unwritten tail lies past every row.
        mask &= p4 <= q4  # [T, Hkv, rows, L]
        sees = mask.any(3)  # [T, Hkv, rows]
        tail_any = past_end.any(2).any(1)  # [T]
        for t, s in enumerate(starts.tolist()):
            rows, n = min(height, qlen - s), int(n_sel[t])
            if n == 0:
                tiles.append(_Tile(s, rows, blocks[:0], None, None))
                continue
            tail = past_end[t, :, : n * bs] if bool(tail_any[t]) else None
            tiles.append(_Tile(s, rows, blocks[order[t, :, :n]], mask[t, :, :rows, : n * bs],
                               tail if tail is not None and bool(tail.any()) else None, bool(sees[t, :, :rows].all())))
    return tiles


def _compaction(held: torch.Tensor, pos: torch.Tensor, q_pos: torch.Tensor, window: torch.Tensor,
                dense: torch.Tensor, mask: torch.Tensor, counted: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Rotations of compacted positions for one tile (see the module docstring). ``held``
    ``[Hkv, L]``: the gathered positions that are sinks or listed. ``counted``: the held positions
    up to each row's window edge and whether each row's own position is held (``[Hkv, rows]``
    each), where the caller has them; otherwise counted here over the gathered positions."""
    rank = held.cumsum(1)  # held positions <= pos[j]
    key_shift = pos + 1 - rank  # u(p_j)
    edge = q_pos[None, :] - window[:, None]  # [Hkv, rows]: the last position before each row's window
    if counted is None:
        held_to_edge = (held[:, None, :] & (pos[:, None, :] <= edge[:, :, None])).sum(-1)
        at_query = (held[:, None, :] & (pos[:, None, :] == q_pos[None, :, None])).any(-1)
    else:
        held_to_edge, at_query = counted
    row_shift = edge + 1 - held_to_edge  # u(p_i - window)
    # Without a window a query need not attend to itself; it then sits right after its last
    # candidate, one position nearer to all of them than u counts.
    row_shift = row_shift - ((window[:, None] == 0) & ~at_query).long()
    far = mask & (pos[:, None, :] <= edge[:, :, None]) & (row_shift[:, :, None] != key_shift[:, None, :])
    far &= ~dense[:, None, None]
    return far, row_shift, key_shift


@dataclass
class _TokenRow:
    """One decode row under token lists: the candidate positions per KV head, padded."""

    blocks: torch.Tensor  # [Hkv, L] physical block of each candidate (padding: the first one)
    offsets: torch.Tensor  # [Hkv, L] offset in the block
    live: torch.Tensor  # [Hkv, L] bool
    gap: torch.Tensor  # [Hkv, L] int64: non-candidates between each candidate and the query


def _prepare_token_row(sel: Selection, b: int, blocks: torch.Tensor, pos: int, bs: int) -> _TokenRow:
    hkv = sel.counts.shape[1]
    per_head = [sel.candidates(b, g, 0, pos, bs) if bool(sel.dense[b, g]) else _token_candidates(sel, b, g, pos)
                for g in range(hkv)]
    width = max(1, max(len(c) for c in per_head))
    positions = torch.zeros(hkv, width, dtype=torch.int64)
    live = torch.zeros(hkv, width, dtype=torch.bool)
    gap = torch.zeros(hkv, width, dtype=torch.int64)
    for g, c in enumerate(per_head):
        positions[g, : len(c)], live[g, : len(c)] = c, True
        if len(c):  # a query that is not its own candidate sits right after the last one
            after = torch.arange(len(c) - 1, -1, -1) + int(int(c[-1]) != pos)
            gap[g, : len(c)] = (pos - c) - after
    return _TokenRow(blocks[positions // bs], positions % bs, live, gap)


def _token_candidates(sel: Selection, b: int, g: int, pos: int) -> torch.Tensor:
    """Sinks, window and listed tokens of the row at ``pos``: ascending, unique (vectorised
    ``Selection.candidates`` for token lists)."""
    sink, window = int(sel.sink[b, g]), int(sel.window[b, g])
    listed = sel.indices[b, g, 0, : int(sel.counts[b, g, 0])].long().cpu()
    parts = [torch.arange(min(sink, pos + 1)), listed[listed <= pos], torch.arange(max(0, pos - window + 1), pos + 1)]
    return torch.unique(torch.cat(parts))


def _token_row(q: torch.Tensor, kv: KVFormat, row: _TokenRow, scale: float, group: int,
               rope: Rope | None = None) -> torch.Tensor:
    """``q`` ``[Hq, 1, D]`` float32 -> ``[1, Hq, D]`` over the row's candidate tokens."""
    hkv, d = kv.num_kv_heads, kv.head_dim
    heads = torch.arange(hkv)[:, None].expand_as(row.blocks)
    dev = kv.device
    k, v = kv.gather_tokens(row.blocks.to(dev), heads.to(dev), row.offsets.to(dev), torch.float32)  # [Hkv, L, D]
    if rope is not None:
        moved = (row.gap != 0).to(dev)
        if bool(moved.any()):
            k = torch.where(moved[..., None], rope.rotate(k, row.gap.to(dev)), k)
    scores = torch.matmul(q.reshape(hkv, group, d), k.transpose(-1, -2)).mul_(scale)  # [Hkv, G, L]
    scores.masked_fill_(~row.live[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    v = v.masked_fill(~row.live[..., None], 0.0)  # padding may read an unwritten slot
    return torch.matmul(probs, v).reshape(1, hkv * group, d)


def _prepare(sel: Selection, plan: BatchPlan, bs: int, compact: bool = False) -> list[list[_Tile] | _TokenRow | None]:
    """Per sequence, its row tiles (None: every head dense). Memoised on the selection."""
    key = ("torch", bs, compact)
    hit = sel.memo.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    prep: list[list[_Tile] | None] = []
    for b in range(plan.num_seqs):
        qlen, seq_len = plan.q_len(b), plan.lens[b]
        if qlen == 0 or bool(sel.dense[b].all()):
            prep.append(None)
            continue
        blocks = plan.block_table[b, : -(-seq_len // bs)].long().cpu()
        if qlen == 1 and sel.granularity == "token":
            prep.append(_prepare_token_row(sel, b, blocks, seq_len - 1, bs))
            continue
        # Tiles no taller than a query block, so that a tile gathers one block's list, not the union of several.
        tile = min(ROW_TILE, sel.query_block) if sel.query_block else ROW_TILE
        if compact and sel.query_block:  # one list per tile (``_compaction``): tiles inside query blocks
            tile = math.gcd(sel.query_block, ROW_TILE)
        first = seq_len - qlen
        sparse_tokens = _token_tile_fits(sel, b, seq_len - 1, sel.query_block_of(qlen - 1), tile)
        if not compact and not sparse_tokens and all(sel.query_block_of(i) == sel.query_block_of(min(i + tile, qlen) - 1)
                               for i in range(0, qlen, tile)):
            prep.append(_prepare_tiles(sel, b, blocks, seq_len, first, qlen, tile, bs))
        else:
            prep.append([_row_tile(sel, b, blocks, seq_len, first, range(i, min(i + tile, qlen)), bs, compact)
                         for i in range(0, qlen, tile)])
    sel.memo[key] = (plan, prep)
    return prep


def _compact_scores(q: torch.Tensor, k: torch.Tensor, tile: _Tile, rope: Rope, group: int) -> torch.Tensor:
    """Scores at compacted positions: ``q`` ``[Hkv, G, rows, D]``, ``k`` ``[Hkv, L, D]`` ->
    ``[Hkv, G, rows, L]`` (unscaled; a pair outside the tile's mask holds anything). A pair that
    moves by ``g = row_shift - key_shift`` is ``q R(g) k = (R(-row_shift) q) . (R(-key_shift) k)``;
    the others are the plain product.

    Keys are gathered in position order, so the ones that move for some row (sinks and listed
    tokens before the rows' windows) come first and the window band last: the moved product runs
    over the columns up to the last that moves, the plain one from the first a row reads unmoved,
    and only the columns in between (keys between the first and the last row's window edge) take both."""
    dev = q.device
    far = tile.far.to(dev)
    f_end, n_start = tile.far_end, tile.plain_start
    q_far = rope.rotate(q, -tile.row_shift.to(dev)[:, None, :].expand(-1, group, -1))
    k_far = rope.rotate(k[:, :f_end], -tile.key_shift.to(dev)[:, :f_end])
    moved = torch.matmul(q_far, k_far[:, None].transpose(-1, -2))  # [Hkv, G, rows, f_end]
    plain = torch.matmul(q, k[:, None, n_start:].transpose(-1, -2))  # [Hkv, G, rows, L - n_start]
    if n_start >= f_end:  # columns in between are read by no row
        hkv, _, rows, _ = q.shape
        between = torch.zeros(hkv, group, rows, n_start - f_end, dtype=moved.dtype, device=dev)
        return torch.cat([moved, between, plain], -1)
    both = torch.where(far[:, None, :, n_start:f_end], moved[..., n_start:], plain[..., : f_end - n_start])
    return torch.cat([moved[..., :n_start], both, plain[..., f_end - n_start:]], -1)


#: Row tiles attended in one SDPA call when they gather as many pages each (``_runs``): fewer
#: calls, and more (tile, KV head) units for the threads to share.
TILE_BATCH = 8


def _fused(tile: _Tile, rope: Rope | None) -> bool:
    """Whether the tile goes to SDPA's fused kernel: every row has a candidate and no pair moves
    (compacted positions that move anything need the two-product scores of ``_compact_scores``)."""
    moves = rope is not None and tile.moves
    return tile.mask is not None and tile.offsets is None and tile.every_row_sees_one and not moves


def _runs(tiles: list[_Tile], rope: Rope | None):
    """``(fused, run)``: consecutive tiles in runs of up to ``TILE_BATCH`` fused tiles of equal
    height and page count; any other tile alone (``fused`` False)."""
    run: list[_Tile] = []
    for t in tiles:
        fused = _fused(t, rope)
        if run and not (fused and len(run) < TILE_BATCH and t.rows == run[0].rows
                        and t.blocks.shape[1] == run[0].blocks.shape[1]):
            yield True, run
            run = []
        run.append(t)
        if not fused:
            yield False, run
            run = []
    if run:
        yield True, run


def _fused_run(q: torch.Tensor, kv: KVFormat, run: list[_Tile], scale: float, group: int) -> torch.Tensor:
    """Consecutive fused tiles of equal height and page count: ``q`` ``[Hq, rows * len(run), D]``
    float32 -> ``[rows * len(run), Hq, D]``, one gather and one SDPA call. (Tile, KV head) pairs are
    SDPA's batch, each with its group of query heads, so one mask row per KV head broadcasts over
    the group rather than being copied for each query head."""
    n, hkv, d, rows = len(run), kv.num_kv_heads, kv.head_dim, run[0].rows
    blocks = torch.stack([t.blocks for t in run])  # [n, Hkv, P]
    heads = torch.arange(hkv)[None, :, None].expand_as(blocks)
    k, v = kv.gather(blocks.to(kv.device), heads.to(kv.device), torch.float32)  # [n, Hkv, P, bs, D]
    k, v = k.reshape(n * hkv, 1, -1, d), v.reshape(n * hkv, 1, -1, d)
    if any(t.tail is not None for t in run):  # the unwritten tail of a last page may hold NaN: zeroed
        tail = torch.stack([t.tail if t.tail is not None else torch.zeros_like(run[0].mask[:, 0]) for t in run])
        tail = tail.reshape(n * hkv, 1, -1, 1).to(kv.device)
        k, v = k.masked_fill(tail, 0.0), v.masked_fill(tail, 0.0)
    # An additive float mask (0 / -inf): SDPA's CPU kernel reads it about a third faster than the
    # same mask as booleans, with identical outputs (the boolean one becomes this inside).
    mask = torch.stack([t.mask for t in run]).to(kv.device)  # [n, Hkv, rows, L]
    bias = torch.where(mask, 0.0, float("-inf")).to(q.dtype).reshape(n * hkv, 1, rows, -1)
    qr = q.reshape(hkv, group, n, rows, d).permute(2, 0, 1, 3, 4).reshape(n * hkv, group, rows, d)
    o = F.scaled_dot_product_attention(qr, k, v, attn_mask=bias, scale=scale, enable_gqa=group > 1)
    return o.reshape(n, hkv * group, rows, d).transpose(1, 2).reshape(n * rows, hkv * group, d)


def _selected_tile(q: torch.Tensor, kv: KVFormat, tile: _Tile, scale: float, group: int,
                   rope: Rope | None = None) -> torch.Tensor:
    """One row tile that ``_fused_run`` does not take: ``q`` ``[Hq, rows, D]`` float32 -> ``[rows, Hq, D]``."""
    hkv, d, rows = kv.num_kv_heads, kv.head_dim, tile.rows
    if tile.mask is None and tile.band is None:
        return torch.zeros(rows, q.shape[0], d, dtype=torch.float32)
    n_sel = tile.blocks.shape[1]
    heads = torch.arange(hkv)[:, None].expand(hkv, n_sel)
    dev = kv.device
    if tile.offsets is not None:  # a token tile: exactly its candidates, [Hkv, L, D]
        kf, vf = kv.gather_tokens(tile.blocks.to(dev), heads.to(dev), tile.offsets.to(dev), torch.float32)
    else:
        k, v = kv.gather(tile.blocks.to(dev), heads.to(dev), torch.float32)  # [Hkv, n_sel, bs, D]
        kf, vf = _flat(k, tile), _flat(v, tile)
    qg = q.reshape(hkv, group, rows, d)
    moves = rope is not None and tile.moves  # otherwise nothing moves
    if _FLASH_WITH_LSE is not None and dev.type == "cpu":
        return _flash_tile(qg, kf, vf, tile, scale, rope if moves else None)
    if tile.band is not None:  # the scores path reads the whole masks
        tile.mask = tile.band.mask()
        far = tile.band.far_mask(tile.band.pos.shape[1])
        tile.far = far & (tile.row_shift[:, :, None] != tile.key_shift[:, None, :])
    if moves:
        scores = _compact_scores(qg, kf, tile, rope, group)
    elif tile.offsets is not None:
        scores = torch.matmul(qg, kf[:, None].transpose(-1, -2))
    else:  # per KV head for its group of query heads, page by page: [Hkv, n_sel, G*rows, bs]
        scores = torch.matmul(q.reshape(hkv, 1, group * rows, d), k.transpose(-1, -2))
        scores = scores.permute(0, 2, 1, 3).reshape(hkv, group, rows, -1)
    return _attend(scores.mul_(scale), tile, vf)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           seen: torch.Tensor | None = None):
    """torch's fused CPU attention of ``q`` ``[Hkv, G, rows, D]`` over ``k``/``v`` ``[Hkv, L, D]``
    under ``mask`` ``[Hkv, rows, L]`` (one row per KV head, broadcast over its group; the keys are
    read once per group, not copied): ``(out [Hkv, G, rows, D], lse [Hkv, G, rows])``. A row with no
    candidate is zero with a log-sum-exp of ``-inf`` (the kernel itself reports 0 there); ``seen``
    ``[Hkv, rows]``, where the caller knows it, says which rows have one; None: every row."""
    hkv, group, rows, d = q.shape
    n = k.shape[1]
    bias = torch.where(mask[:, None], 0.0, float("-inf")).to(q.dtype)
    o, lse = _FLASH_WITH_LSE(q.contiguous(), k[:, None].expand(hkv, group, n, d), v[:, None].expand(hkv, group, n, d),
                             0.0, False, attn_mask=bias, scale=scale)
    return o, lse if seen is None else lse.masked_fill_(~seen[:, None], float("-inf"))


def _flash_tile(q: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, tile: _Tile, scale: float,
                rope: Rope | None) -> torch.Tensor:
    """``_selected_tile`` on torch's fused CPU attention: ``q`` ``[Hkv, G, rows, D]``, the tile's
    gathered keys and values ``[Hkv, L, D]`` -> ``[rows, Hq, D]``. With ``rope`` (pairs move) the
    softmax over a row's candidates is split in two calls merged by their log-sum-exps, as
    ``_compact_scores`` splits the product: the pairs that move (``tile.far``, among the columns
    up to the last that moves), read with the row's and the key's own rotations, and the others
    (from the first column a row reads unmoved), read plain. The same weights and keys as the
    scores path, without building the scores (one 16k prompt of the extrapolation benchmark:
    149 s before, 117 s after, with ``_Band``)."""
    hkv, group, rows, d = q.shape
    band = tile.band
    if rope is None:
        mask = band.mask() if band is not None else tile.mask
        o, _ = _flash(q, kf, vf, mask, scale, None if tile.every_row_sees_one else mask.any(-1))
    else:
        f_end, n_start = tile.far_end, tile.plain_start
        q_far = rope.rotate(q, -tile.row_shift.to(q.device)[:, None, :].expand(-1, group, -1))
        k_far = rope.rotate(kf[:, :f_end], -tile.key_shift.to(q.device)[:, :f_end])
        if band is not None:  # every row reads its own position plain
            far, near, far_seen, near_seen = band.far_mask(f_end), band.near_mask(), band.held_to_edge > 0, None
        else:
            far = tile.far[..., :f_end]
            near = (tile.mask & ~tile.far)[..., n_start:]
            far_seen, near_seen = far.any(-1), near.any(-1)
        o_far, lse_far = _flash(q_far, k_far, vf[:, :f_end], far, scale, far_seen)
        o_near, lse_near = _flash(q, kf[:, n_start:], vf[:, n_start:], near, scale, near_seen)
        top = torch.maximum(lse_far, lse_near)
        top = torch.where(torch.isinf(top), 0.0, top)  # a row with no candidate at all: both weights 0
        w_far, w_near = (lse_far - top).exp_()[..., None], (lse_near - top).exp_()[..., None]
        o = (o_far * w_far + o_near * w_near) / (w_far + w_near).clamp_(min=torch.finfo(o_far.dtype).tiny)
    return o.reshape(hkv * group, rows, d).transpose(0, 1)


def _flat(x: torch.Tensor, tile: _Tile) -> torch.Tensor:
    """Gathered pages ``[Hkv, n_sel, bs, D]`` -> ``[Hkv, n_sel * bs, D]``. The unwritten tail of a
    last page may hold anything, NaN included, which a mask does not cancel in a product: zeroed."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    return x if tile.tail is None else x.masked_fill(tile.tail[..., None], 0.0)


def _attend(scores: torch.Tensor, tile: _Tile, vf: torch.Tensor) -> torch.Tensor:
    """Scaled scores ``[Hkv, G, rows, L]`` under the tile's mask, over values ``[Hkv, L, D]`` ->
    ``[rows, Hq, D]``; a row with no candidate is all zero."""
    hkv, group, rows, _ = scores.shape
    scores.masked_fill_(~tile.mask.to(scores.device)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    o = torch.matmul(probs.reshape(hkv, group * rows, -1), vf)  # [Hkv, G*rows, D]
    return o.reshape(hkv * group, rows, vf.shape[-1]).transpose(0, 1)


@dataclass
class _DecodeBatch:
    """Every row of a decode-only batch under a selection, as one padded token list per (sequence,
    KV head): where each candidate lies in the cache, and which list entries are real."""

    blocks: torch.Tensor  # [B, Hkv, W] physical block of each candidate (padding: position 0's)
    offsets: torch.Tensor  # [B, Hkv, W]
    live: torch.Tensor  # [B, Hkv, W] bool
    gap: torch.Tensor | None = None  # [B, Hkv, W] int64, compacted positions only: as ``_TokenRow.gap``


def _decoding_only(plan: BatchPlan) -> bool:
    return plan.num_tokens == plan.num_seqs and all(plan.q_len(b) == 1 for b in range(plan.num_seqs))


def _prepare_decode(sel: Selection, plan: BatchPlan, bs: int, compact: bool = False) -> _DecodeBatch:
    """The candidates of every decode row at once (memoised on the selection): one boolean row per
    (sequence, KV head) over the positions up to the longest sequence marks sinks, window, listed
    units (whole pages or tokens) and, for a dense head, everything; the marks become ascending
    position lists by one cumulative sum and one scatter. A few tensor operations for the whole
    batch, where the row-by-row path costs a few dozen per sequence. With ``compact``, also each
    candidate's distance in compacted positions (``_prepare_token_row``'s ``gap``). Page lists
    at absolute positions are marked page by page (``_decode_by_page``)."""
    key = ("torch-decode", bs, compact)
    hit = sel.memo.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    if sel.granularity == "page" and not compact:
        prep = _decode_by_page(sel, plan, bs)
    else:
        prep = _decode_by_position(sel, plan, bs, compact)
    sel.memo[key] = (plan, prep)
    return prep


def _decode_by_page(sel: Selection, plan: BatchPlan, bs: int) -> _DecodeBatch:
    """``_prepare_decode`` for page lists without compaction. A row's candidates are its sinks and
    window (the pages that hold them, with those positions live: the same for every layer of the
    step, so built once per plan, ``_fixed_pages``) and its listed pages, whose positions up to
    the row are live where they are neither sink nor window (those are the fixed part's, and a
    candidate must be counted once). The order of a row's candidates does not
    matter to attention at absolute positions, so the two parts are concatenated, not sorted.
    Dead entries re-read position 0, always written."""
    if bool(sel.dense.any()):
        return _decode_by_position(sel, plan, bs, False)
    sink, window = sel.sink.cpu(), sel.window.cpu()
    key = ("torch-decode-fixed", bs, tuple(sink.flatten().tolist()), tuple(window.flatten().tolist()))
    fixed_pos, fixed_live = plan.memo(key, lambda: _fixed_pages(plan, bs, sink, window))
    parts_pos, parts_live = [fixed_pos], [fixed_live]
    if sel.indices.shape[3] > 0:
        row = torch.tensor(plan.lens, dtype=torch.int64)[:, None, None] - 1
        idx = sel.indices[:, :, 0].long().cpu()  # [B, Hkv, K]
        alive = (torch.arange(idx.shape[2]) < sel.counts[:, :, 0].cpu()[..., None]) & (idx >= 0)
        pos = (idx[..., None] * bs + torch.arange(bs)).flatten(2)  # [B, Hkv, K * bs]
        unfixed = (pos >= sink.long()[..., None]) & (pos <= row - window.long()[..., None])  # neither sink nor window
        parts_pos.append(pos)
        parts_live.append(alive.repeat_interleave(bs, 2) & unfixed & (pos <= row))
    pos, live = torch.cat(parts_pos, 2), torch.cat(parts_live, 2)
    pos = torch.where(live, pos, 0)
    blocks = plan.block_table.long().cpu().gather(1, (pos // bs).flatten(1)).view_as(pos)
    return _DecodeBatch(blocks, pos % bs, live)


def _fixed_pages(plan: BatchPlan, bs: int, sink: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For ``_decode_by_page``: per (sequence, KV head) the pages of the sinks, then those of the
    window (from the first page past the sinks), as positions ``[B, Hkv, F * bs]`` with those
    that are sinks or window live, and that mask."""
    row = torch.tensor(plan.lens, dtype=torch.int64)[:, None, None] - 1
    sink, window = sink.long()[..., None], window.long()[..., None]
    n_sink = torch.minimum(sink, row + 1)
    sink_end = -(-n_sink // bs)  # pages [0, sink_end) hold the sinks
    first = (row - window + 1).clamp(min=0)
    window_start = torch.where(window > 0, torch.maximum(first // bs, sink_end), row // bs + 1)
    n_window = (row // bs + 1 - window_start).clamp(min=0)
    s_pages, w_pages = int(sink_end.max()), int(n_window.max())
    page = torch.cat([torch.arange(s_pages).expand(*sink.shape[:2], -1),
                      window_start + torch.arange(w_pages)], 2)  # [B, Hkv, F]
    held = torch.cat([torch.arange(s_pages) < sink_end, torch.arange(w_pages) < n_window], 2)
    pos = (page[..., None] * bs + torch.arange(bs)).flatten(2)
    live = held.repeat_interleave(bs, 2) & ((pos < sink) | (pos > row - window)) & (pos <= row)
    return pos, live


def _decode_by_position(sel: Selection, plan: BatchPlan, bs: int, compact: bool) -> _DecodeBatch:
    """``_prepare_decode`` position by position (token lists, and compacted positions)."""
    b, hkv = sel.counts.shape[:2]
    lens = torch.tensor(plan.lens, dtype=torch.int64)
    row = (lens - 1)[:, None, None]  # each query's position
    span = int(lens.max())
    at = torch.arange(span)
    sink, window = sel.sink.cpu().long()[..., None], sel.window.cpu().long()[..., None]
    chosen = (at < sink) | (at > row - window) | sel.dense.cpu()[..., None]  # [B, Hkv, span]
    if sel.indices.shape[3] > 0:
        idx = sel.indices[:, :, 0].long().cpu()  # [B, Hkv, K]
        live = torch.arange(idx.shape[2]) < sel.counts[:, :, 0].cpu()[..., None]
        units = span if sel.granularity == "token" else -(-span // bs)
        listed = torch.zeros(b, hkv, units + 1, dtype=torch.bool)  # last column: a dump for dead entries
        listed.scatter_(2, torch.where(live & (idx >= 0) & (idx < units), idx, units), True)
        listed = listed[..., :units]
        chosen |= listed if sel.granularity == "token" else listed.repeat_interleave(bs, 2)[..., :span]
    chosen &= at <= row  # causal, and never past a sequence's own end
    counts = chosen.sum(2)
    width = max(1, int(counts.max()))
    slot = torch.where(chosen, chosen.cumsum(2) - 1, width)
    pos = torch.zeros(b, hkv, width + 1, dtype=torch.int64).scatter_(2, slot, at.expand(b, hkv, span))[..., :width]
    live = torch.arange(width) < counts[..., None]
    pos = torch.where(live, pos, 0)  # padding re-reads position 0, always written: finite, then masked
    table = plan.block_table.long().cpu()
    blocks = table.gather(1, (pos // bs).flatten(1)).view_as(pos)
    prep = _DecodeBatch(blocks, pos % bs, live)
    if compact:  # candidates sit side by side, the query right after the last (or on it, when listed)
        last = pos.gather(2, (counts - 1).clamp(min=0)[..., None])
        after = (counts[..., None] - 1 - torch.arange(width)) + (last != row).long()
        prep.gap = torch.where(live, (row - pos) - after, 0)
    return prep


def _decode_batch(query: torch.Tensor, kv: KVFormat, prep: _DecodeBatch, scale: float, out: torch.Tensor,
                  rope: Rope | None = None) -> None:
    """One gather of every row's candidate tokens and two batched products: ``query`` ``[B, Hq, D]``
    (row b is sequence b) -> ``out[:B]``. A row with no candidate gets zeros."""
    b, hkv, width = prep.blocks.shape
    d = kv.head_dim
    group = query.shape[1] // hkv
    dev = kv.device
    heads = torch.arange(hkv, device=dev)[None, :, None].expand(b, hkv, width)
    live = prep.live.to(dev)
    if rope is None and cpu_op.serves(kv, query):  # quantized pages, one native call: each candidate a span
        offsets = prep.offsets.to(dev)
        spans = torch.stack([torch.where(live, prep.blocks.to(dev), -1), offsets, offsets + 1], -1)
        out[:b] = cpu_op.decode_codes(kv.rotate_query(query[:b].float()), kv, spans, scale).to(out.dtype)
        return
    if rope is None and hasattr(kv, "gather_token_codes"):
        # Quantized pages: attend on the codes, scaling W scores instead of W x D elements.
        kc, vc = kv.gather_token_codes(prep.blocks.to(dev), heads, prep.offsets.to(dev))
        _attend_codes(query, kv, kc, vc, live, scale, out)
        return
    k, v = kv.gather_tokens(prep.blocks.to(dev), heads, prep.offsets.to(dev), torch.float32)  # [B, Hkv, W, D]
    if rope is not None:
        moved = (prep.gap != 0).to(dev)
        if bool(moved.any()):
            k = torch.where(moved[..., None], rope.rotate(k, prep.gap.to(dev)), k)
    q = query[:b].float().view(b, hkv, group, d)
    scores = torch.matmul(q, k.transpose(2, 3)).mul_(scale)  # [B, Hkv, G, W]
    scores.masked_fill_(~live[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    out[:b] = torch.matmul(probs, v).view(b, hkv * group, d).to(out.dtype)


def _decode_page_lists(query: torch.Tensor, kv, sel: Selection, plan: BatchPlan, scale: float,
                       out: torch.Tensor) -> None:
    """A decode-only batch whose selection is page lists alone (TokenSelect's page granularity
    hands over sinks, window and chosen pages as one list) over quantized pages: the listed
    cells are gathered whole and attended on their codes, with no per-position candidate
    lists to build. Positions past a row (its last page's unwritten tail) are masked, and
    their scales and zero points zeroed, so whatever those slots hold never reaches the output."""
    b, hkv, width = sel.indices.shape[0], sel.indices.shape[1], sel.indices.shape[3]
    d, bs, dev = kv.head_dim, kv.block_size, kv.device
    if cpu_op.serves(kv, query):  # one native call over whole cells, each row's tail cut by its span
        lens = plan.memo(("cpu_op.lens",), lambda: torch.tensor(plan.lens, dtype=torch.int64))
        spans = cpu_op.page_list_spans(sel.indices[:, :, 0], sel.counts[:, :, 0], lens, plan.block_table, bs)
        out[:b] = cpu_op.decode_codes(kv.rotate_query(query[:b].float()), kv, spans, scale).to(out.dtype)
        return
    row = (torch.tensor(plan.lens, dtype=torch.int64, device=dev) - 1)[:, None, None]
    idx = sel.indices[:, :, 0].long().to(dev)  # [B, Hkv, K]
    alive = ((torch.arange(width, device=dev) < sel.counts[:, :, 0:1].to(dev)) & (idx >= 0) & (idx * bs <= row))
    pages = torch.where(alive, idx, 0)
    blocks = plan.block_table.long().to(dev).gather(1, pages.flatten(1)).view(b, hkv, width)
    kc, vc = kv.gather_cell_codes(blocks, torch.arange(hkv, device=dev)[None, :, None].expand(b, hkv, width))
    pos = pages[..., None] * bs + torch.arange(bs, device=dev)
    live = (alive[..., None] & (pos <= row[..., None])).view(b, hkv, width * bs)

    def flat(c: quant.Codes, zero_dead: bool) -> quant.Codes:
        s, z = c.scale.reshape(b, hkv, width * bs, -1), c.zero.reshape(b, hkv, width * bs, -1)
        if zero_dead:
            s, z = s.masked_fill(~live[..., None], 0.0), z.masked_fill(~live[..., None], 0.0)
        return quant.Codes(c.codes.view(b, hkv, width * bs, d), s, z, c.group_size)

    _attend_codes(query, kv, flat(kc, False), flat(vc, True), live, scale, out)


def _attend_codes(query: torch.Tensor, kv, kc: "quant.Codes", vc: "quant.Codes", live: torch.Tensor, scale: float,
                  out: torch.Tensor) -> None:
    """Decode rows ``query[:B]`` over their candidates' codes ``[B, Hkv, W, D]`` where ``live``
    ``[B, Hkv, W]`` -> ``out[:B]``; a row with no live candidate gets zeros."""
    b, hkv, _, d = kc.codes.shape
    group = query.shape[1] // hkv
    q = kv.rotate_query(query[:b].float()).view(b, hkv, group, d)
    scores = quant.scores(q, kc).mul_(scale).masked_fill_(~live[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    out[:b] = quant.weighted_sum(probs, vc).view(b, hkv * group, d).to(out.dtype)


def _decode_dense_codes(query: torch.Tensor, kv, plan: BatchPlan, scale: float, out: torch.Tensor) -> None:
    """A decode-only batch without a selection over quantized pages (a dense head, or a context
    below a selector's ``min_context``): every written position of each sequence, as the native
    op's spans (each page whole, the last up to the row), one call for the batch."""
    b, bs = plan.num_seqs, kv.block_size

    def spans() -> torch.Tensor:
        lens = torch.tensor(plan.lens, dtype=torch.int64)
        n_pages = (lens + bs - 1) // bs
        width = max(1, int(n_pages.max()))
        pages = torch.arange(width, dtype=torch.int32).expand(b, 1, width)
        return cpu_op.page_list_spans(pages, n_pages.to(torch.int32)[:, None], lens, plan.block_table, bs)[:, 0]

    every = plan.memo(("cpu_op.dense-spans", bs), spans)  # the same for every head and layer of the step
    out[:b] = cpu_op.decode_codes(kv.rotate_query(query[:b].float()), kv, every, scale).to(out.dtype)


def paged_attention_torch(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, scale: float, out: torch.Tensor,
                          selection: Selection | None = None, rope: Rope | None = None) -> torch.Tensor:
    hq = query.shape[1]
    group = hq // kv.num_kv_heads
    bs = kv.block_size
    if selection is None and rope is None and plan.num_seqs and cpu_op.serves(kv, query) and _decoding_only(plan):
        _decode_dense_codes(query, kv, plan, scale, out)
        return out
    if selection is not None and plan.num_seqs and _decoding_only(plan):
        if rope is None and hasattr(kv, "gather_cell_codes") and selection.only_page_lists:
            _decode_page_lists(query, kv, selection, plan, scale, out)
            return out
        _decode_batch(query, kv, _prepare_decode(selection, plan, bs, rope is not None), scale, out, rope)
        return out
    prep = _prepare(selection, plan, bs, rope is not None) if selection is not None else None
    for b in range(plan.num_seqs):
        start, qlen, seq_len = plan.starts[b], plan.q_len(b), plan.lens[b]
        if qlen == 0:
            continue
        q = query[start: start + qlen].transpose(0, 1).float()  # [Hq, qlen, D]
        if prep is None or prep[b] is None:
            blocks = plan.block_table[b, : -(-seq_len // bs)].long()
            o = _dense_sequence(q, kv, blocks, seq_len, scale, group)
        elif isinstance(prep[b], _TokenRow):
            o = _token_row(q, kv, prep[b], scale, group, rope)
        else:
            o = torch.cat([_fused_run(q[:, run[0].start: run[-1].start + run[-1].rows], kv, run, scale, group)
                           if fused else
                           _selected_tile(q[:, run[0].start: run[0].start + run[0].rows], kv, run[0], scale, group, rope)
                           for fused, run in _runs(prep[b], rope)])
        out[start: start + qlen] = o.to(out.dtype)
    return out
