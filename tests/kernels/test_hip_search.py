"""HiP's hierarchical page search: the torch twin against the float64 statement of the same search,
the true top-k on inputs where it is known, and its recall of the full scan's top-k, reported and
bounded below. Every test draws fresh random inputs (the seed is in the failure message)."""
import pytest
import torch

from lcx_plugin.kernels.paged.hip_search import centre_radius, exact_top_pages, search_pages, search_pages_reference


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _bounds(g, pages, hkv, d, smooth):
    """Per-page key minima/maxima: a random walk along the context (scores that vary smoothly, as
    attention's do) or independent pages (no structure for the search to follow)."""
    base = torch.randn(pages, hkv, d, generator=g).cumsum(0) * (3 / pages ** 0.5) if smooth else torch.zeros(pages, hkv, d)
    return base - torch.rand(pages, hkv, d, generator=g), base + torch.rand(pages, hkv, d, generator=g)


@pytest.mark.parametrize("pages,k,lo", [(7, 4, 0), (20, 4, 1), (100, 4, 2), (300, 8, 1), (64, 32, 0), (50, 3, 1)])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_search_matches_the_float64_search(pages, k, lo, smooth, impl):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    nqb, hkv, rows, d = 3, 2, 6, 16
    q = torch.randn(nqb, hkv, rows, d, generator=g)
    kmin, kmax = _bounds(g, pages, hkv, d, smooth)
    hi = torch.tensor([pages, max(lo, pages - 5), lo + 1])  # whole range, most of it, one page
    got, counts = search_pages(q, *centre_radius(kmin, kmax), lo, hi, k, impl=impl)
    want = search_pages_reference(q, kmin, kmax, lo, hi.tolist(), k)
    for i in range(nqb):
        for h in range(hkv):
            n = int(counts[i, h])
            assert n == min(k, int(hi[i]) - lo), f"seed={seed}: block {i} head {h} chose {n} pages"
            assert got[i, h, :n].tolist() == want[i][h], f"seed={seed}: block {i} head {h}"


def test_no_eligible_page_chooses_nothing():
    q = torch.randn(2, 1, 4, 8)
    c = torch.zeros(5, 1, 8)
    pages, counts = search_pages(q, c, c, 3, torch.tensor([3, 1]), 4)
    assert counts.tolist() == [[0], [0]]


@pytest.mark.parametrize("pages", [256, 500])
@pytest.mark.parametrize("k", [4, 8, 16])
def test_finds_the_true_top_pages_of_a_single_peak(pages, k):
    """Bounds that fall off with the distance from one peak page: the true top-k is the run of
    pages nearest the peak, and the search, which keeps the chunks whose middles lie nearest the
    peak at every level, finds exactly that, for every position of the peak. (With k < 4 or some
    other small k, a left-leaning middle page can lose the run's far edge: the search is a
    heuristic, exact on this shape only for these budgets, which is what is asserted.)"""
    d = 4
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    missed = []
    for peak in range(pages):
        off = torch.arange(pages) - peak
        dist = off.abs().float() + 1e-3 * (off > 0)  # no ties: the left neighbour wins
        centre = torch.zeros(pages, 1, d)
        centre[:, 0, 0] = -dist
        got, counts = search_pages(q, centre, torch.zeros_like(centre), 0, torch.tensor([pages]), k)
        truth = exact_top_pages(q, centre, torch.zeros_like(centre), 0, torch.tensor([pages]), k)[0][0]
        if set(got[0, 0, : int(counts[0, 0])].tolist()) != truth:
            missed.append(peak)
    assert not missed, f"missed the true top-{k} for peaks at {missed[:10]}"


def test_a_budget_covering_the_eligible_pages_chooses_them_all():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    kmin, kmax = _bounds(g, 30, 2, 8, smooth=False)
    q = torch.randn(4, 2, 3, 8, generator=g)
    hi = torch.tensor([30, 12, 5, 2])
    got, counts = search_pages(q, *centre_radius(kmin, kmax), 2, hi, 28)
    for i, h in enumerate(hi.tolist()):
        for g_ in range(2):
            assert got[i, g_, : int(counts[i, g_])].tolist() == list(range(2, h)), f"seed={seed}"


def test_recall_of_the_full_scans_top_pages():
    """The search scores ``2k`` pages per round instead of all of them; on smoothly varying bounds
    it recovers most of the full scan's top-k (measured: 0.75 on average over 30 seeds, never below
    0.62, at 256 pages and k=8), far above what chance picks (k / pages = 0.03; 0.12 measured on
    unstructured bounds, where only the last rounds' choices are informed)."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    pages, k, nqb, hkv = 256, 8, 4, 2

    def recall(smooth):
        out = []
        for _ in range(8):
            kmin, kmax = _bounds(g, pages, hkv, 16, smooth)
            q = torch.randn(nqb, hkv, 8, 16, generator=g)
            c, r = centre_radius(kmin, kmax)
            hi = torch.full((nqb,), pages)
            got, _ = search_pages(q, c, r, 0, hi, k)
            truth = exact_top_pages(q, c, r, 0, hi, k)
            out += [len(set(got[i, h].tolist()) & truth[i][h]) / k for i in range(nqb) for h in range(hkv)]
        return sum(out) / len(out)

    smooth, flat = recall(True), recall(False)
    print(f"hip search recall of the exact top-{k} of {pages} pages: smooth {smooth:.2f}, unstructured {flat:.2f}")
    assert smooth >= 0.5, f"seed={seed}: recall {smooth:.2f} on smooth bounds"
    assert smooth > flat + 0.2, f"seed={seed}: smooth {smooth:.2f} vs unstructured {flat:.2f}"


def test_bad_shapes_are_refused():
    q = torch.randn(2, 1, 4, 8)
    c = torch.zeros(5, 1, 8)
    with pytest.raises(ValueError, match="hi must be"):
        search_pages(q, c, c, 0, torch.tensor([5]), 2)
    with pytest.raises(ValueError, match="exceed"):
        search_pages(q, c, c, 0, torch.tensor([5, 6]), 2)
    with pytest.raises(ValueError, match="k must be"):
        search_pages(q, c, c, 0, torch.tensor([5, 5]), 0)
