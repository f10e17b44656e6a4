"""The paged KV-cache layout shared by every lcx kernel.

One tensor per layer, shaped ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]``
(the shape vLLM allocates for the head-major ``LBHNC`` layout). Inside one
(block, kv head) cell the memory is read as two planes, ``[2, block_size, head_dim]``:
plane 0 holds the keys of the block's tokens, plane 1 their values. A key tile is then
``block_size`` contiguous rows, which is what both the Triton kernel and the torch twin
load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int

    @classmethod
    def of(cls, kv_cache: torch.Tensor) -> "KVLayout":
        if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
            raise ValueError(
                f"kv_cache must be [num_blocks, num_kv_heads, block_size, 2*head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        nb, hkv, bs, two_d = kv_cache.shape
        return cls(nb, hkv, bs, two_d // 2)


def kv_planes(kv_cache: torch.Tensor) -> torch.Tensor:
    """View ``kv_cache`` as ``[num_blocks, num_kv_heads, 2, block_size, head_dim]`` (no copy)."""
    lay = KVLayout.of(kv_cache)
    return kv_cache.view(lay.num_blocks, lay.num_kv_heads, 2, lay.block_size, lay.head_dim)


def write_kv(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_dim]
    slot_mapping: torch.Tensor,  # [>=T] int, slot = block * block_size + offset; < 0 skips
) -> None:
    """Store new keys and values at their slots. Negative slots (padding) are skipped."""
    planes = kv_planes(kv_cache)
    bs = planes.shape[3]
    slots = slot_mapping[: key.shape[0]].long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    blocks, offsets = slots // bs, slots % bs
    # Advanced indices split by a slice put the token dimension first: [T, Hkv, D].
    planes[blocks, :, 0, offsets] = key.to(planes.dtype)
    planes[blocks, :, 1, offsets] = value.to(planes.dtype)
