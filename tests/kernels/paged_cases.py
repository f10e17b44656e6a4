"""Random paged-attention problems shared by the kernel tests, in every storage format."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lcx_plugin.kernels.paged import BatchPlan, KVFormat, Selection, formats, mixed, quant

FORMATS = ("plain", "vllm-cpu-vec", "vllm-cpu-amx", "nhd", "token-pool")
#: Quantized pages: "int<bits>-g<group_size>[-rot]" (group 0: the whole head; -rot: keys stored
#: Hadamard-rotated, the int4 default at power-of-two head dims).
QUANT_FORMATS = ("int8-g0", "int4-g0", "int4-g16", "int4-g0-rot", "mixed-g0")
FOUR_D_FORMATS = ("plain", "vllm-cpu-vec", "nhd", "token-pool")  # what the Triton kernel reads


@dataclass
class Problem:
    query: torch.Tensor
    kv: KVFormat
    plan: BatchPlan
    scale: float


def empty_format(fmt: str, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, fill: float = float("nan")) -> KVFormat:
    """A cache in format ``fmt``, every slot holding ``fill`` (quantized pages: all bytes 0xFF,
    whose bfloat16 scales read as NaN)."""
    if fmt.startswith("mixed"):  # a quarter of each page may hold int8 copies (all slots free: 0xFFFF is -1)
        group = int(fmt.split("-g")[1]) or head_dim
        c = mixed.cell_bytes(head_dim, group, block_size, 0.25)
        return mixed.mixed(torch.full((num_blocks, num_kv_heads, block_size, c), 255, dtype=torch.uint8), head_dim,
                           group, 0.25)
    if fmt.startswith("int"):
        rotate = fmt.endswith("-rot") and quant.rotates_keys(head_dim, 4)  # odd head dims: not rotated
        bits, group = (int(x) for x in fmt.removesuffix("-rot")[3:].split("-g"))
        group = group or head_dim
        r = quant.row_bytes(head_dim, bits, group)
        buf = torch.full((num_blocks, num_kv_heads, block_size, 2 * r), 255, dtype=torch.uint8)
        return quant.quantized(buf, head_dim, bits, group, rotate)
    if fmt in ("plain", "vllm-cpu-vec", "vllm-cpu-amx"):
        buf = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_dim), fill, dtype=dtype)
        return formats.plain(buf) if fmt == "plain" else formats.vllm_cpu(buf, fmt.rsplit("-", 1)[1])
    if fmt == "nhd":
        buf = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), fill, dtype=dtype)
        return formats.nhd(buf[0], buf[1])
    if fmt == "token-pool":
        k = torch.full((num_blocks * block_size, num_kv_heads, head_dim), fill, dtype=dtype)
        return formats.token_pool(k, torch.full_like(k, fill), block_size)
    raise ValueError(fmt)


def make_problem(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
                 head_dim: int = 64, block_size: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0,
                 fmt: str = "plain") -> Problem:
    """Random Q/K/V written through the format's own writer into a cache whose blocks are handed out
    in a random order. Every slot no sequence owns, including the tail of each last page, holds
    NaN, so a kernel that reads outside a sequence's context poisons its own output."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(pages) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((len(seq_lens), max(pages) + 1), num_blocks - 1, dtype=torch.int32)
    kv = empty_format(fmt, num_blocks, num_kv_heads, block_size, head_dim, dtype)
    used = 0
    for b, (s, n) in enumerate(zip(seq_lens, pages)):
        block_table[b, :n] = perm[used: used + n].to(torch.int32)
        used += n
        slots = block_table[b, torch.arange(s) // block_size].long() * block_size + torch.arange(s) % block_size
        k = torch.randn(s, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(s, num_kv_heads, head_dim, generator=g).to(dtype)
        kv.write(k, v, slots)
        if getattr(kv, "mixed", False):  # random importance: some tokens of each page hold int8 copies
            kv.promote(k, v, slots, torch.rand(s, num_kv_heads, generator=g))
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(dtype)
    return Problem(query, kv, BatchPlan.from_lists(query_lens, seq_lens, block_table), head_dim ** -0.5)


def random_lists(problem: Problem, granularity: str, keep: float, seed: int, query_blocks: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ascending subsets of each (sequence, KV head, query block)'s pages or tokens, with junk
    past the counts: ``indices [B, Hkv, NQB, width]``, ``counts [B, Hkv, NQB]``."""
    g = torch.Generator().manual_seed(seed)
    bs, hkv = problem.kv.block_size, problem.kv.num_kv_heads
    lens = problem.plan.lens
    units = [(-(-s // bs)) if granularity == "page" else s for s in lens]
    width = max(units)
    indices = torch.full((len(lens), hkv, query_blocks, width), -7, dtype=torch.int32)
    counts = torch.zeros(len(lens), hkv, query_blocks, dtype=torch.int32)
    for b, n in enumerate(units):
        for h in range(hkv):
            for q in range(query_blocks):
                chosen = torch.nonzero(torch.rand(n, generator=g) < keep).flatten()
                indices[b, h, q, : chosen.numel()] = chosen.to(torch.int32)
                counts[b, h, q] = chosen.numel()
    return indices, counts


def random_selection(problem: Problem, granularity: str, keep: float, seed: int = 1, *, sink=0, window=0,
                     dense=False, query_block: int = 0) -> Selection:
    nqb = 1 if query_block == 0 else -(-problem.plan.max_query_len // query_block)
    indices, counts = random_lists(problem, granularity, keep, seed, nqb)
    return Selection.build(problem.plan.num_seqs, problem.kv.num_kv_heads, granularity=granularity,
                           indices=indices, counts=counts, sink=sink, window=window, dense=dense,
                           query_block=query_block)
