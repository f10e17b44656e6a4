"""``hip``: selections for prefill (per query block) and decode (page lists with a refreshed search),
block-sparse attention over them exact against the float64 reference in both kernels, per-request
state that follows its request, and config errors. Fresh random caches with shuffled block tables."""
import pytest
import torch

from lcx_plugin import selectors
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.head_patterns import ModelShape
from lcx_plugin.kernels.paged import BatchPlan, formats, paged_attention
from lcx_plugin.kernels.paged.hip_search import centre_radius, search_pages_reference
from lcx_plugin.kernels.paged.reference import paged_attention_reference
from lcx_plugin.selectors import SelectContext
from lcx_plugin.state import PageSummaries, RequestStates

BS, D, HKV, HQ = 16, 32, 2, 4
HIP = {"sink": 16, "window": 48, "budget": 64, "query_block": 32, "dense_layers": []}


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def hip(**kw):
    return selectors.get("hip").from_dict({**HIP, **kw})


class Cache:
    """Random keys/values for ``seq_lens`` tokens, written through the cache's writer and into the
    page summaries; the rest of the cache is NaN."""

    def __init__(self, seq_lens, seed):
        g = torch.Generator().manual_seed(seed)
        self.seq_lens = list(seq_lens)
        pages = [-(-s // BS) for s in seq_lens]
        n_blocks = sum(pages) + 2
        perm = torch.randperm(n_blocks, generator=g)
        self.table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
        at = 0
        for b, p in enumerate(pages):
            self.table[b, :p] = perm[at: at + p].int()
            at += p
        self.kv = formats.plain(torch.full((n_blocks, HKV, BS, 2 * D), float("nan")))
        self.pages = PageSummaries(n_blocks, HKV, D, BS)
        for b, s in enumerate(seq_lens):
            # Keys drift along the context, so pages differ the way real ones do.
            k = torch.randn(s, HKV, D, generator=g) + torch.randn(s, 1, D, generator=g).cumsum(0) * 0.05
            pos = torch.arange(s)
            slots = self.table[b, pos // BS].long() * BS + pos % BS
            self.kv.write(k, torch.randn(s, HKV, D, generator=g), slots)
            self.pages.update(k, slots)

    def ctx(self, q_lens, seq_lens, requests, ids=None, layer=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        plan = BatchPlan.from_lists(q_lens, seq_lens, self.table[: len(seq_lens)])
        query = torch.randn(sum(q_lens), HQ, D, generator=g)
        ids = ids or tuple(f"r{b}" for b in range(len(seq_lens)))
        return SelectContext(layer=layer, query=query, kv=self.kv, plan=plan, request_ids=tuple(ids), num_heads=HQ,
                             pages=self.pages, requests=requests, scale=D ** -0.5)


def _block_rows(query, start, qlen, r0, r1):
    """Rows ``r0 .. r1-1`` of one sequence as the search sees them: ``[Hkv, G * rows, D]``."""
    q = query[start + r0: start + r1].view(r1 - r0, HKV, HQ // HKV, D)
    return q.permute(1, 2, 0, 3).reshape(HKV, -1, D)


def test_prefill_lists_are_the_search_of_each_query_block_and_attention_is_exact():
    """A whole prompt (200 rows) and a later chunk (70 rows of 400) in one batch: each query
    block lists the float64 search's pages among those wholly before its first row's window;
    torch twin and Triton agree with the float64 reference over that selection."""
    seed = _seed()
    cache = Cache([200, 400], seed)
    sel_cfg = hip()
    ctx = cache.ctx([200, 70], [200, 400], RequestStates(), seed=seed)
    sel = sel_cfg.select(ctx)
    assert sel.granularity == "page" and sel.query_block == HIP["query_block"]
    assert sel.sink.eq(HIP["sink"]).all() and sel.window.eq(HIP["window"]).all()
    lo, k = 1, HIP["budget"] // BS
    for b, (qlen, s) in enumerate([(200, 200), (70, 400)]):
        blocks = cache.table[b, : -(-s // BS)].long()
        kmin, kmax = cache.pages.min[blocks], cache.pages.max[blocks]
        start = ctx.plan.starts[b]
        for i in range(-(-qlen // 32)):
            r0, r1 = 32 * i, min(32 * (i + 1), qlen)
            first = s - qlen + r0
            hi = max(lo, -(-max(0, first - HIP["window"] + 1) // BS))
            rows = _block_rows(ctx.query, start, qlen, r0, r1)[None]
            want = search_pages_reference(rows, kmin, kmax, lo, [hi], k)[0]
            for g in range(HKV):
                n = int(sel.counts[b, g, i])
                assert sel.indices[b, g, i, :n].tolist() == want[g], f"seed={seed}: seq {b} block {i} head {g}"
    expected = paged_attention_reference(ctx.query, cache.kv, ctx.plan, D ** -0.5, sel)
    for impl in ("torch", "triton"):
        out = torch.full_like(ctx.query, float("nan"))
        paged_attention(ctx.query, cache.kv, ctx.plan, D ** -0.5, out, sel, impl=impl)
        err = (out.double() - expected).abs().max().item()
        assert err < 2e-5, f"seed={seed} {impl}: max abs error {err:.3g}"


def test_decode_is_page_lists_searched_every_refresh_and_reused_between():
    seed = _seed()
    cache = Cache([300, 260], seed)
    sel_cfg = hip(refresh_every=3)
    requests = RequestStates()
    lens = [290, 250]
    seen = []
    for step in range(5):
        ctx = cache.ctx([1, 1], [lens[0] + step, lens[1] + step], requests, seed=seed + step)
        sel = sel_cfg.select(ctx)
        assert sel.only_page_lists, "decode selections must be page lists the engine's op can run"
        for b in range(2):
            s = lens[b] + step
            n_pages, hi_now = -(-s // BS), (s - HIP["window"]) // BS
            pages = set(sel.indices[b, 0, 0, : int(sel.counts[b, 0, 0])].tolist())
            assert 0 in pages and set(range(hi_now, n_pages)) <= pages, f"seed={seed}: sinks or window missing"
            assert len(pages) <= 1 + HIP["budget"] // BS + (n_pages - hi_now) + 1
        expected = paged_attention_reference(ctx.query, cache.kv, ctx.plan, D ** -0.5, sel)
        out = torch.full_like(ctx.query, float("nan"))
        paged_attention(ctx.query, cache.kv, ctx.plan, D ** -0.5, out, sel, impl="torch")
        assert (out.double() - expected).abs().max().item() < 2e-5, f"seed={seed} step {step}"
        seen.append(dict(requests.counters))
    # Two requests: searched at steps 0 and 3, reused at 1, 2 and 4.
    assert seen[-1]["hip_searches"] == 4 and seen[-1]["hip_reuses"] == 6, seen[-1]


def test_pages_that_leave_the_window_stay_until_the_next_search():
    seed = _seed()
    cache = Cache([400], seed)
    sel_cfg = hip(refresh_every=100)
    requests = RequestStates()
    first = sel_cfg.select(cache.ctx([1], [300], requests, seed=seed))
    window_pages = set(range((300 - HIP["window"]) // BS, -(-300 // BS)))
    later = sel_cfg.select(cache.ctx([1], [380], requests, seed=seed + 1))
    kept = set(later.indices[0, 0, 0, : int(later.counts[0, 0, 0])].tolist())
    assert window_pages <= kept, "a page the window held at the search was dropped before the next one"
    assert set(first.indices[0, 0, 0, : int(first.counts[0, 0, 0])].tolist()) <= kept


def test_state_follows_the_request_not_the_row():
    """Request A's reused pages must not serve request B when B takes A's row."""
    seed = _seed()
    cache = Cache([300, 300], seed)
    sel_cfg = hip(refresh_every=50)
    requests = RequestStates()
    sel_cfg.select(cache.ctx([1], [290], requests, ids=("A",), seed=seed))
    # B, a different request in row 0 now, needs a search of its own.
    before = requests.counters["hip_searches"]
    sel_cfg.select(cache.ctx([1], [291], requests, ids=("B",), seed=seed + 1))
    assert requests.counters["hip_searches"] == before + 1
    requests.drop(["A"])
    assert "A" not in requests and "B" in requests


def test_dense_layers_short_contexts_and_covering_budgets_stay_dense():
    cache = Cache([300], _seed())
    sel_cfg = hip(dense_layers=[0, 1])
    assert sel_cfg.select(cache.ctx([1], [300], RequestStates(), layer=1)) is None
    assert sel_cfg.select(cache.ctx([1], [300], RequestStates(), layer=2)) is not None
    plan = BatchPlan.from_lists([1, 5, 1], [100, 128, 129], torch.zeros(3, 9, dtype=torch.int32))
    assert sel_cfg.dense_rows(plan) == [True, True, False]  # 16 + 48 + 64 = 128 tokens kept anyway
    assert hip(min_context=1000).dense_rows(plan) == [True, True, True]
    assert hip(budget=1.0).dense_rows(plan) == [True, True, True]


@pytest.mark.parametrize("bad,match", [
    ({"query_block": 40}, "query_block"),
    ({"query_block": 0}, "query_block"),
    ({"refresh_every": 0}, "refresh_every"),
    ({"dense_layers": [0, -1]}, "dense_layers"),
    ({"dense_layers": "0,1"}, "dense_layers"),
    ({"dense_layers": [True]}, "dense_layers"),
    ({"budget": 0}, "budget"),
    ({"budget": 1.5}, "budget"),
    ({"refresh": 3}, "unknown key"),
])
def test_bad_config_is_one_clear_error(bad, match):
    with pytest.raises(LcxConfigError, match=match):
        hip(**bad)


def test_dense_layers_must_exist_in_the_model():
    assert hip(dense_layers=[0, 29]).check_model(ModelShape(30, 3, 64)) == []
    (msg,) = hip(dense_layers=[30]).check_model(ModelShape(30, 3, 64))
    assert "dense_layers [30]" in msg and "30 layers" in msg


def test_config_round_trips_through_json():
    cfg = hip(dense_layers=[3, 1, 1])
    assert cfg.dense_layers == (1, 3)
    assert selectors.get("hip").from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["dense_layers"] == [1, 3]
