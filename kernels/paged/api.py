"""The public entry point: one signature, dispatched to the Triton kernel or the torch twin."""
from __future__ import annotations

from typing import Literal

import torch

from .formats import KVFormat
from .plan import BatchPlan
from .rope import Rope
from .selection import Selection

Impl = Literal["auto", "triton", "torch"]


def _check(query: torch.Tensor, kv: KVFormat, plan: BatchPlan, out: torch.Tensor, selection: Selection | None) -> None:
    t, hq, d = query.shape
    if d != kv.head_dim:
        raise ValueError(f"query head_dim {d} != cache head_dim {kv.head_dim}")
    if hq % kv.num_kv_heads:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {kv.num_kv_heads}")
    if out.shape[0] < t or out.shape[1:] != query.shape[1:]:
        raise ValueError(f"out {tuple(out.shape)} cannot hold query {tuple(query.shape)}")
    if plan.num_tokens > t:
        raise ValueError(f"the plan covers {plan.num_tokens} query rows but query has {t}")
    if selection is not None and tuple(selection.counts.shape[:2]) != (plan.num_seqs, kv.num_kv_heads):
        raise ValueError(f"selection is for {tuple(selection.counts.shape[:2])} (seqs, kv heads); the batch has "
                         f"({plan.num_seqs}, {kv.num_kv_heads})")


def triton_cannot_compact(kv: KVFormat, rope: Rope) -> str | None:
    """Why the Triton kernel cannot read ``kv`` at compacted positions under ``rope`` (None: it
    can; the torch twin always can)."""
    r = rope.rotary_dim
    if r & (r - 1):
        return f"the rotated dimensions ({r}) are not a power of two"
    if getattr(kv, "rotate_keys", False):
        return "keys are stored Hadamard-rotated (int4 pages), and RoPE does not commute with that rotation"
    return None


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv: KVFormat,  # the layer's paged keys and values
    plan: BatchPlan,  # the step's ragged batch
    scale: float,
    out: torch.Tensor,  # [>=T, Hq, D], written in place
    selection: Selection | None = None,
    *,
    impl: Impl = "auto",
    rope: Rope | None = None,  # compacted positions: re-rotate what each row reads
) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its paged context.

    Query row ``i`` of sequence ``b`` sits at position ``seq_lens[b] - q_len_b + i`` and attends to
    cached positions ``<=`` its own, restricted to ``selection`` when one is given (see
    ``Selection``). Covers prefill, chunked prefill or prefix reuse, decode and ragged mixtures of
    them, with GQA. ``impl="auto"`` takes Triton on CUDA tensors and the torch twin elsewhere.

    With ``rope``, each row's candidates are read at compacted positions (sinks, then listed
    tokens, then the window, in order, the query last; see ``torch_impl``): the model's RoPE is
    re-applied to the cached keys, so query-key distances stay within the tokens attended.
    """
    _check(query, kv, plan, out, selection)
    if impl == "auto":
        impl = "triton" if query.is_cuda else "torch"
    if impl == "triton":
        from .triton_impl import paged_attention_triton

        return paged_attention_triton(query, kv, plan, scale, out, selection, rope)
    if impl == "torch":
        from .torch_impl import paged_attention_torch

        return paged_attention_torch(query, kv, plan, scale, out, selection, rope)
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
