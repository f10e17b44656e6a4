"""Toy batches for selector tests."""
import torch

from lcx_plugin.kernels.paged import BatchPlan, formats
from lcx_plugin.selectors import SelectContext

BS = 8


def make_ctx(q_lens, seq_lens, hkv=2, hq=4, d=16) -> SelectContext:
    """A context over a toy batch: ``q_lens`` new tokens ending each of ``seq_lens``."""
    pages = max(-(-s // BS) for s in seq_lens)
    table = torch.arange(len(seq_lens) * pages, dtype=torch.int32).view(len(seq_lens), pages)
    kv = formats.plain(torch.zeros(len(seq_lens) * pages, hkv, BS, 2 * d))
    plan = BatchPlan.from_lists(q_lens, seq_lens, table)
    return SelectContext(layer=0, query=torch.zeros(sum(q_lens), hq, d), kv=kv, plan=plan,
                         request_ids=tuple(f"r{i}" for i in range(len(seq_lens))), num_heads=hq)
