"""Random paged-attention problems shared by the kernel tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcx_plugin.kernels.paged import Selection, write_kv


@dataclass
class Problem:
    query: torch.Tensor
    kv_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float


def make_problem(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Problem:
    """Random Q/K/V written into a cache whose blocks are handed out in a random order.

    Every cache slot that no sequence owns, including the tail of each last page, holds NaN,
    so a kernel that reads outside a sequence's context poisons its own output.
    """
    g = torch.Generator().manual_seed(seed)
    pages = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(pages) + 3  # a few blocks nobody owns
    max_pages = max(pages) + 1
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((len(seq_lens), max_pages), num_blocks - 1, dtype=torch.int32)
    kv_cache = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_dim), float("nan"), dtype=dtype)
    used = 0
    for b, (s, n) in enumerate(zip(seq_lens, pages)):
        block_table[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
        slots = (block_table[b, torch.arange(s) // block_size].long() * block_size + torch.arange(s) % block_size)
        k = torch.randn(s, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(s, num_kv_heads, head_dim, generator=g).to(dtype)
        write_kv(k, v, kv_cache, slots)
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    query = torch.randn(starts[-1], num_heads, head_dim, generator=g).to(dtype)
    return Problem(
        query=query,
        kv_cache=kv_cache,
        block_table=block_table,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        scale=head_dim**-0.5,
    )


def random_selection(problem: Problem, granularity: str, keep: float, seed: int = 1) -> Selection:
    """A random sorted subset of each (sequence, kv head)'s pages or tokens."""
    g = torch.Generator().manual_seed(seed)
    bs = problem.kv_cache.shape[2]
    hkv = problem.kv_cache.shape[1]
    lens = problem.seq_lens.tolist()
    units = [(-(-s // bs)) if granularity == "page" else s for s in lens]
    width = max(units)
    indices = torch.full((len(lens), hkv, width), -7, dtype=torch.int32)  # junk past counts
    counts = torch.zeros(len(lens), hkv, dtype=torch.int32)
    for b, n in enumerate(units):
        for h in range(hkv):
            chosen = torch.nonzero(torch.rand(n, generator=g) < keep).flatten()
            indices[b, h, : chosen.numel()] = chosen.to(torch.int32)
            counts[b, h] = chosen.numel()
    return Selection(granularity, indices, counts)
