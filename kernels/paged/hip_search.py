"""Hierarchical top-k page search: HiP's mask search over a paged cache.

HiP (Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention", https://arxiv.org/abs/2406.09827) finds, for each block of
queries, the key blocks worth attending to without scoring every one of them. Here the key
blocks are the cache's pages and each page is summarised by the per-page key bounds the layer
keeps anyway (``PageSummaries``), so the search reads two vectors per page it visits and never a
key.

For one query block (its rows ``Q``, every query head of one KV head) and its eligible pages
``[lo, hi)``:

1. Cut ``[lo, hi)`` into ``2k`` chunks of (nearly) equal size; empty chunks never win.
2. Score each chunk by **one representative page**, its middle one ``lo_c + (size_c - 1) // 2``:
   the largest Quest bound of any row of ``Q`` against it,
   ``max_{q in Q} sum_d max(q_d kmin_d, q_d kmax_d) = max_q (q·c + |q|·r)`` with the page's key
   centre ``c = (kmin + kmax) / 2`` and radius ``r = (kmax - kmin) / 2`` (two matrix products).
3. Keep the ``k`` best chunks (ties: the lower chunk), split each into two halves (a chunk of one
   page keeps itself and an empty half), and repeat from 2 until every kept chunk is one page.

Each round scores ``2k`` pages per query block, and there are about ``log2(T / (2k * page))``
rounds, so a prefill of ``T`` tokens costs ``O(T log T)`` products, not the ``O(T^2)`` of a full
scan. The search trusts that scores vary smoothly along the context (a chunk whose middle page
scores low rarely hides the best page); ``hip_recall`` in the tests measures how often that holds.

``search_pages`` runs the Triton kernel (``hip_search_triton.py``) on CUDA tensors and the torch
twin here elsewhere (every query block and KV head of one sequence at once);
``search_pages_reference`` the same search in float64 with plain loops, the tests' oracle; and
``exact_top_pages`` the full scan the search approximates, for recall.
"""
from __future__ import annotations

import torch


def centre_radius(kmin: torch.Tensor, kmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page key centre and radius (float32) from the key minima and maxima."""
    kmin, kmax = kmin.float(), kmax.float()
    return (kmax + kmin) * 0.5, (kmax - kmin) * 0.5


def _check(rows: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, lo: int, hi: torch.Tensor, k: int) -> None:
    if rows.dim() != 4:
        raise ValueError(f"rows must be [query_blocks, kv_heads, rows, head_dim], got {tuple(rows.shape)}")
    nqb, hkv, _, d = rows.shape
    if centre.dim() != 3 or centre.shape != radius.shape or centre.shape[1:] != (hkv, d):
        raise ValueError(f"centre and radius must both be [pages, {hkv}, {d}], got {tuple(centre.shape)} "
                         f"and {tuple(radius.shape)}")
    if hi.shape != (nqb,):
        raise ValueError(f"hi must be [query_blocks={nqb}], got {tuple(hi.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if lo < 0 or bool((hi > centre.shape[0]).any()):
        raise ValueError(f"eligible pages [lo={lo}, hi<={int(hi.max()) if hi.numel() else 0}) exceed the "
                         f"{centre.shape[0]} pages summarised")


def search_pages(rows: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, lo: int, hi: torch.Tensor,
                 k: int, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The hierarchical search for every query block and KV head of one sequence.

    rows: ``[NQB, Hkv, R, D]``: query block ``i``'s rows (times the softmax scale or not: the
        ranking is the same), every query head of KV head ``g`` stacked along ``R``. Blocks with
        fewer rows repeat one of theirs (a repeated row changes no maximum).
    centre, radius: ``[P, Hkv, D]`` float32: page ``j`` of the sequence (logical order).
    lo: first eligible page (the pages before it are kept anyway, e.g. sinks).
    hi: ``[NQB]`` int64: query block ``i`` may choose pages ``lo <= j < hi[i]``.
    k: pages to choose per (query block, KV head).

    impl: "auto" (Triton on CUDA tensors, this torch twin elsewhere), "triton" or "torch".

    Returns ``pages [NQB, Hkv, k]`` int32, ascending in the first ``counts`` entries (``min(k,
    hi - lo)``), and ``counts [NQB, Hkv]`` int32.
    """
    _check(rows, centre, radius, lo, hi, k)
    if impl == "auto":
        impl = "triton" if rows.is_cuda else "torch"
    if impl == "triton":
        from .hip_search_triton import search_pages_triton

        return search_pages_triton(rows, centre, radius, lo, hi, k)
    if impl != "torch":
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    nqb, hkv, _, _ = rows.shape
    dev = rows.device
    if nqb == 0 or int(hi.max()) <= lo:  # nothing eligible anywhere
        return (torch.zeros(nqb, hkv, k, dtype=torch.int32, device=dev),
                torch.zeros(nqb, hkv, dtype=torch.int32, device=dev))
    q = rows.float()
    q_abs = q.abs()
    c_t, r_t = centre.float().transpose(0, 1), radius.float().transpose(0, 1)  # [Hkv, P, D]
    heads = torch.arange(hkv, device=dev)[None, :, None]
    m = 2 * k
    span = (hi.to(dev).long() - lo).clamp(min=0)[:, None, None]  # [NQB, 1, 1]
    cut = lo + (torch.arange(m + 1, device=dev)[None, None, :] * span) // m  # [NQB, 1, m+1]
    c_lo = cut[..., :-1].expand(nqb, hkv, m).contiguous()
    c_hi = cut[..., 1:].expand(nqb, hkv, m).contiguous()
    while True:
        size = c_hi - c_lo
        rep = (c_lo + (size - 1).clamp(min=0) // 2).clamp(max=max(c_t.shape[1] - 1, 0))
        cc = c_t[heads, rep]  # [NQB, Hkv, m, D]
        rr = r_t[heads, rep]
        bound = torch.matmul(q, cc.transpose(-1, -2)) + torch.matmul(q_abs, rr.transpose(-1, -2))  # [NQB, Hkv, R, m]
        score = bound.amax(2).masked_fill_(size <= 0, float("-inf"))
        keep = min(k, score.shape[-1])
        best = torch.sort(-score, dim=-1, stable=True).indices[..., :keep]  # ties: the lower chunk
        k_lo, k_hi = c_lo.gather(-1, best), c_hi.gather(-1, best)
        k_ok = score.gather(-1, best) > float("-inf")
        if bool(((k_hi - k_lo) <= 1).all()):
            break
        mid = k_lo + (k_hi - k_lo + 1) // 2
        c_lo = torch.stack([k_lo, mid], -1).flatten(-2)
        c_hi = torch.stack([mid, k_hi], -1).flatten(-2)
        c_hi = torch.where(torch.stack([k_ok, k_ok], -1).flatten(-2), c_hi, c_lo)  # a lost chunk stays lost
    pages = torch.where(k_ok, k_lo, torch.iinfo(torch.int32).max).sort(-1).values
    counts = k_ok.sum(-1)
    return pages.clamp(max=torch.iinfo(torch.int32).max).to(torch.int32), counts.to(torch.int32)


def search_pages_reference(rows: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lo: int, hi: list[int],
                           k: int) -> list[list[list[int]]]:
    """The same search in float64, one (query block, KV head) at a time with plain loops; the
    bound computed as ``sum_d max(q_d kmin_d, q_d kmax_d)``. Returns ``pages[i][g]`` ascending."""
    nqb, hkv, nrows, _ = rows.shape
    out = []
    for i in range(nqb):
        per_head = []
        for g in range(hkv):
            q = rows[i, g].double()

            def score(page: int) -> float:
                lo_k, hi_k = kmin[page, g].double(), kmax[page, g].double()
                return max(float(torch.maximum(q[r] * lo_k, q[r] * hi_k).sum()) for r in range(nrows))

            n = max(0, hi[i] - lo)
            m = 2 * k
            chunks = [(lo + j * n // m, lo + (j + 1) * n // m) for j in range(m)]
            while True:
                scored = [(score(a + (b - a - 1) // 2), j) for j, (a, b) in enumerate(chunks) if b > a]
                scored.sort(key=lambda t: (-t[0], t[1]))
                kept = [chunks[j] for _, j in scored[:k]]
                if all(b - a <= 1 for a, b in kept):
                    break
                chunks = [half for a, b in kept for half in ((a, a + (b - a + 1) // 2), (a + (b - a + 1) // 2, b))]
            per_head.append(sorted(a for a, _ in kept))
        out.append(per_head)
    return out


def exact_top_pages(rows: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, lo: int, hi: torch.Tensor,
                    k: int) -> list[list[set[int]]]:
    """What the search approximates: the ``k`` eligible pages with the largest bound, by scoring
    every one (``O(T^2)`` over a prefill). ``[NQB][Hkv]`` sets of pages."""
    q, q_abs = rows.float(), rows.float().abs()
    bound = (torch.matmul(q, centre.float().permute(1, 2, 0)) + torch.matmul(q_abs, radius.float().permute(1, 2, 0))).amax(2)
    out = []
    for i in range(rows.shape[0]):
        a, b = lo, int(hi[i])
        per_head = []
        for g in range(rows.shape[1]):
            if b <= a:
                per_head.append(set())
                continue
            top = bound[i, g, a:b].topk(min(k, b - a)).indices + a
            per_head.append(set(top.tolist()))
        out.append(per_head)
    return out
