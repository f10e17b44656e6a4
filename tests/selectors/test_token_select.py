"""``token_select``: scores, soft vote, top-k and the selection cache against a float64 statement
of the method, on fresh random caches with shuffled block tables."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcx_plugin import selectors
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.kernels.paged import BatchPlan, formats
from lcx_plugin.selectors import SelectContext
from lcx_plugin.selectors.token_select import soft_vote, top_units
from lcx_plugin.state import PageSummaries, RequestStates

BS, D = 16, 32


class Cache:
    """Random keys/values written through the cache's own writer (and the page summaries)."""

    def __init__(self, seq_lens, hkv=2, seed=0, dtype=torch.float32, keys=None):
        g = torch.Generator().manual_seed(seed)
        self.seq_lens, self.hkv = list(seq_lens), hkv
        pages = [-(-s // BS) for s in seq_lens]
        n_blocks = sum(pages) + 3
        perm = torch.randperm(n_blocks, generator=g)
        width = max(pages)
        self.table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
        at = 0
        for b, p in enumerate(pages):
            self.table[b, :p] = perm[at: at + p].int()
            at += p
        self.kv = formats.plain(torch.full((n_blocks, hkv, BS, 2 * D), float("nan"), dtype=dtype))
        self.pages = PageSummaries(n_blocks, hkv, D, BS)
        self.keys = []
        for b, s in enumerate(seq_lens):
            k = torch.randn(s, hkv, D, generator=g) if keys is None else keys[b]
            v = torch.randn(s, hkv, D, generator=g)
            pos = torch.arange(s)
            slots = self.table[b, pos // BS].long() * BS + pos % BS
            self.kv.write(k.to(dtype), v.to(dtype), slots)
            self.pages.update(k.to(dtype), slots)
            self.keys.append(k.to(dtype).double())

    def ctx(self, query, request_ids, requests, rows=None) -> SelectContext:
        rows = list(range(len(self.seq_lens))) if rows is None else rows
        plan = BatchPlan.from_lists([1] * len(rows), [self.seq_lens[r] for r in rows], self.table[rows])
        return SelectContext(layer=0, query=query, kv=self.kv, plan=plan, request_ids=tuple(request_ids),
                             num_heads=query.shape[1], pages=self.pages, requests=requests, scale=D ** -0.5)


class Ranked(list):
    """An expected selection (sorted units) that also accepts either side of a near-tie at the
    budget's cut: units whose float64 votes lie within ``TIE`` (relative) of the cut may trade
    places, since float32 scoring cannot order them reliably. Fresh random inputs meet such ties
    now and then (votes 2.6e-5 apart, seed 1486031828); every other unit must match exactly."""

    TIE = 1e-4

    def __init__(self, units, votes=None, ranked=(), k=0):
        super().__init__(sorted(units))
        self.ties = frozenset()
        if votes is not None and 0 < k < len(ranked):
            hi, lo = float(votes[ranked[k - 1]]), float(votes[ranked[k]])
            if hi - lo <= self.TIE * hi:
                self.ties = frozenset(p for p in ranked if lo - self.TIE * hi <= float(votes[p]) <= hi + self.TIE * hi)

    def __eq__(self, got):
        got = list(got)
        return len(got) == len(self) and set(got) ^ set(self) <= self.ties

    def __ne__(self, got):
        return not self == got

    __hash__ = None


def expected_tokens(keys, q, sel, hkv):
    """The float64 statement: per KV head, the budget's best positions outside sinks and window."""
    s = keys.shape[0]
    group = q.shape[0] // hkv
    logits = torch.einsum("hd,thd->ht", q.double(), keys.repeat_interleave(group, 1)) * D ** -0.5
    votes = torch.softmax(logits, -1).view(hkv, group, s).sum(1)
    k = sel.budget_for(s)
    out = []
    for g in range(hkv):
        ranked = sorted((p for p in range(sel.sink, s - sel.window)), key=lambda p: (-float(votes[g, p]), p))
        out.append(Ranked(ranked[:k], votes[g], ranked, k))
    return out


def expected_pages(keys, q, sel, hkv):
    s = keys.shape[0]
    group = q.shape[0] // hkv
    n = -(-s // BS)
    bound = torch.zeros(q.shape[0], n, dtype=torch.float64)
    for p in range(n):
        page = keys[p * BS: (p + 1) * BS]  # [t, hkv, D]
        lo, hi = page.min(0).values.repeat_interleave(group, 0), page.max(0).values.repeat_interleave(group, 0)
        bound[:, p] = torch.maximum(q.double() * lo, q.double() * hi).sum(-1) * D ** -0.5
    votes = torch.softmax(bound, -1).view(hkv, group, n).sum(1)
    lo = -(-sel.sink // BS)
    hi = max(lo, max(0, s - sel.window) // BS)
    k = -(-sel.budget_for(s) // BS)
    out = []
    for g in range(hkv):
        ranked = sorted(range(lo, min(hi, n)), key=lambda p: (-float(votes[g, p]), p))
        out.append(Ranked(set(ranked[:k]) | set(range(min(lo, n))) | set(range(hi, n)), votes[g], ranked, k))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq", [2, 6])
def test_token_granularity_matches_the_float64_statement(dtype, hq):
    lens = [300, 517, 1000]
    cache = Cache(lens, seed=hq, dtype=dtype)
    q = torch.randn(len(lens), hq, D, generator=torch.Generator().manual_seed(7)) * 3
    sel = selectors.get("token_select")(sink=8, window=32, budget=40, reuse_similarity=None)
    out = sel.select(cache.ctx(q.to(dtype), ["a", "b", "c"], RequestStates()))
    assert out.granularity == "token" and int(out.sink[0, 0]) == 8 and int(out.window[0, 0]) == 32
    for b in range(len(lens)):
        want = expected_tokens(cache.keys[b], q[b].to(dtype), sel, 2)
        for g in range(2):
            got = out.indices[b, g, 0, : int(out.counts[b, g, 0])].tolist()
            if dtype == torch.float32:
                assert got == want[g]
            else:  # bf16 keys, float32 arithmetic: the sets agree up to near-ties at the cut
                assert len(set(got) ^ set(want[g])) <= 4


def test_page_granularity_matches_the_float64_statement():
    lens = [40, 300, 777]
    cache = Cache(lens, seed=3)
    q = torch.randn(len(lens), 4, D, generator=torch.Generator().manual_seed(1)) * 3
    sel = selectors.get("token_select")(sink=4, window=40, budget=0.2, granularity="page", reuse_similarity=None)
    assert sel.needs_page_summaries
    out = sel.select(cache.ctx(q, ["a", "b", "c"], RequestStates()))
    assert out.only_page_lists  # sinks and window folded in as whole pages: the engine's own op runs it
    for b in range(len(lens)):
        want = expected_pages(cache.keys[b], q[b], sel, 2)
        for g in range(2):
            assert out.indices[b, g, 0, : int(out.counts[b, g, 0])].tolist() == want[g]


def test_ties_go_to_the_earlier_unit():
    votes = torch.zeros(1, 1, 10)
    votes[0, 0, 7] = 1.0
    idx, cnt = top_units(votes, torch.ones(1, 10, dtype=torch.bool), torch.tensor([4]))
    assert idx[0, 0, : int(cnt[0, 0])].tolist() == [0, 1, 2, 7]
    # identical keys give identical votes: the selection is the first k eligible positions
    same = torch.ones(1, 400, 2, D)
    cache = Cache([400], keys=same)
    sel = selectors.get("token_select")(sink=4, window=16, budget=10, reuse_similarity=None)
    out = sel.select(cache.ctx(torch.randn(1, 2, D), ["a"], RequestStates()))
    assert out.indices[0, 0, 0, :10].tolist() == list(range(4, 14))


def test_soft_vote_gives_each_query_head_one_vote():
    logits = torch.tensor([[[50.0, 0.0, 0.0], [0.0, 0.0, 0.1]]])  # one sharp head, one flat one
    votes = soft_vote(logits, 1)
    assert torch.allclose(votes.sum(-1), torch.tensor([[2.0]]))
    assert votes[0, 0, 0] > 1.0 and votes[0, 0, 2] > votes[0, 0, 1]
    # past-the-end units (-inf) get nothing
    assert soft_vote(torch.tensor([[[1.0, float("-inf")]]]), 1)[0, 0, 1] == 0


@settings(max_examples=40, deadline=None)
@given(sink=st.integers(0, 40), window=st.integers(1, 100), budget=st.one_of(st.integers(1, 200), st.floats(0.01, 1.0)),
       granularity=st.sampled_from(["token", "page"]), lens=st.lists(st.integers(1, 400), min_size=1, max_size=3),
       seed=st.integers(0, 1000))
def test_properties(sink, window, budget, granularity, lens, seed):
    sel = selectors.get("token_select")(sink=sink, window=window, budget=budget, granularity=granularity,
                                        reuse_similarity=None)
    plan = BatchPlan.from_lists([1] * len(lens), lens, torch.zeros(len(lens), 30, dtype=torch.int32))
    dense = sel.dense_rows(plan)
    for s, d in zip(lens, dense):
        assert d == (s <= sink + window + sel.budget_for(s))  # a budget covering the context is dense
    rows = [b for b, d in enumerate(dense) if not d]
    if not rows:
        return
    cache = Cache(lens, seed=seed)
    q = torch.randn(len(rows), 4, D, generator=torch.Generator().manual_seed(seed))
    out = sel.select(cache.ctx(q, [f"r{b}" for b in rows], RequestStates(), rows))
    for j, b in enumerate(rows):
        pos = lens[b] - 1
        for g in range(2):
            live = out.indices[j, g, 0, : int(out.counts[j, g, 0])]
            assert torch.equal(live, live.unique()) and (live >= 0).all()  # unique, ascending
            limit = -(-lens[b] // BS) if granularity == "page" else lens[b]
            assert (live < limit).all()
            cand = set(out.candidates(j, g, 0, pos, BS).tolist())
            assert set(range(min(sink, pos + 1))) <= cand and set(range(max(0, pos - window + 1), pos + 1)) <= cand
            assert all(p <= pos for p in cand)


def test_selection_cache_reuses_within_a_request_and_never_across_requests():
    lens = [600, 600, 600]
    cache = Cache(lens, seed=5)
    requests = RequestStates()
    sel = selectors.get("token_select")(sink=4, window=32, budget=64, reuse_similarity=0.9)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, D, generator=g)
    first = sel.select(cache.ctx(q[:2], ["a", "b"], requests, [0, 1]))
    # one lookup per request and KV head (2 heads)
    assert requests.counters["selection_lookups"] == 4 and requests.counters.get("selection_hits", 0) == 0
    # a query close to the last one reuses the selection; a different one is scored afresh
    near = q[:2] + 0.01 * torch.randn(2, 4, D, generator=g)
    near[1] = torch.randn(4, D, generator=g)
    second = sel.select(cache.ctx(near, ["a", "b"], requests, [0, 1]))
    assert requests.counters["selection_lookups"] == 8 and requests.counters["selection_hits"] == 2
    assert torch.equal(second.indices[0], first.indices[0])
    # "b" leaves, "c" joins in its row with the query "a" had: "c" must not inherit anything
    third = sel.select(cache.ctx(torch.stack([near[0], q[0]]), ["a", "c"], requests, [0, 2]))
    assert requests.counters["selection_hits"] == 4  # only "a"
    assert not torch.equal(third.indices[1], first.indices[0])  # scored on "c"'s own keys
    want = expected_tokens(cache.keys[2], q[0], sel, 2)
    assert third.indices[1, 0, 0, : int(third.counts[1, 0, 0])].tolist() == want[0]
    # a preempted or finished request loses its state: resumed, it is scored again
    requests.drop(["a"])
    sel.select(cache.ctx(near[:1], ["a"], requests, [0]))
    assert requests.counters["selection_hits"] == 4


def test_each_kv_head_decides_its_own_reuse():
    """A head whose query heads stayed similar keeps its units (and the query that chose them);
    the head that moved takes fresh units: what splitting the heads over ranks would decide."""
    cache = Cache([600], seed=7)
    requests = RequestStates()
    sel = selectors.get("token_select")(sink=4, window=32, budget=64, reuse_similarity=0.9)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, D, generator=g)  # 4 query heads over 2 KV heads
    first = sel.select(cache.ctx(q, ["a"], requests, [0]))
    moved = q.clone()
    moved[0, 2:] = torch.randn(2, D, generator=g)  # KV head 1's query heads
    moved[0, :2] += 0.01 * torch.randn(2, D, generator=g)  # KV head 0's: nearly the same
    second = sel.select(cache.ctx(moved, ["a"], requests, [0]))
    assert requests.counters["selection_hits"] == 1
    assert torch.equal(second.indices[0, 0, 0, : int(second.counts[0, 0, 0])],
                       first.indices[0, 0, 0, : int(first.counts[0, 0, 0])])
    want = expected_tokens(cache.keys[0], moved[0], sel, 2)
    assert second.indices[0, 1, 0, : int(second.counts[0, 1, 0])].tolist() == want[1]
    state = requests.get("a", 0)
    assert torch.equal(state["query"][:2], q[0, :2]) and torch.equal(state["query"][2:], moved[0, 2:])


def test_bad_config_is_one_clear_error():
    cls = selectors.get("token_select")
    with pytest.raises(LcxConfigError, match="granularity"):
        cls.from_dict({"granularity": "tokens"})
    with pytest.raises(LcxConfigError, match="reuse_similarity"):
        cls.from_dict({"reuse_similarity": 2.0})
    with pytest.raises(LcxConfigError, match="budget"):
        cls.from_dict({"budget": 0})
    with pytest.raises(LcxConfigError, match="unknown"):
        cls.from_dict({"k": 5})


def test_prefill_rows_are_dense():
    sel = selectors.get("token_select")(sink=4, window=16, budget=8)
    plan = BatchPlan.from_lists([1, 50, 1], [1000, 1000, 10], torch.zeros(3, 80, dtype=torch.int32))
    assert sel.dense_rows(plan) == [False, True, True]


def test_bytes_read_are_counted_from_the_selection():
    """Per decode token: dense reads every key and value; the page variant reads the page bounds
    (float32 minima and maxima) and the listed pages; the token variant reads every key to score
    and the selected tokens' keys and values; a cache hit skips the scoring."""
    lens = [1000]
    cache = Cache(lens, seed=9)
    q = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(3))
    hkv, row = 2, 2 * D * 4  # float32 cache: a token's key + value per KV head
    page = selectors.get("token_select")(sink=4, window=40, budget=64, granularity="page", reuse_similarity=None)
    requests = RequestStates()
    out = page.select(cache.ctx(q, ["a"], requests))
    c = requests.counters
    assert c["kv_bytes_dense"] == 1000 * hkv * row
    assert c["kv_bytes_scoring"] == 63 * hkv * D * 2 * 4  # 63 pages of 16
    assert c["kv_bytes_attention"] == int(out.counts.sum()) * BS * row
    token = selectors.get("token_select")(sink=4, window=40, budget=64, reuse_similarity=0.5)
    requests = RequestStates()
    token.select(cache.ctx(q, ["a"], requests))
    c = requests.counters
    assert c["kv_bytes_scoring"] == 1000 * hkv * D * 4
    assert c["kv_bytes_attention"] == (4 + 40 + 64) * hkv * row
    token.select(cache.ctx(q, ["a"], requests))  # the same query: a hit, no scoring
    assert c["selection_hits"] == hkv and c["kv_bytes_scoring"] == 1000 * hkv * D * 4
    assert c["kv_bytes_attention"] == 2 * (4 + 40 + 64) * hkv * row


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), k=st.lists(st.integers(0, 320), min_size=1, max_size=3), levels=st.integers(1, 6),
       p=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_top_units_is_the_brute_force_set_with_ties_to_the_lower_unit(n, k, levels, p, seed):
    # few distinct vote levels: many ties at the cut; -0.0 and +0.0 are one level
    g = torch.Generator().manual_seed(seed)
    b = len(k)
    votes = torch.randint(0, levels, (b, 2, n), generator=g).float() / levels
    votes[votes == 0] = torch.where(torch.rand(int((votes == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    eligible = torch.rand(b, n, generator=g) < p
    idx, counts = top_units(votes, eligible, torch.tensor(k))
    for r in range(b):
        for h in range(2):
            units = [i for i in range(n) if eligible[r, i]]
            want = sorted(sorted(units, key=lambda i: (-float(votes[r, h, i]), i))[: k[r]])
            c = int(counts[r, h])
            assert c == len(want) and idx[r, h, :c].tolist() == want


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(1, 900), min_size=1, max_size=3), sink=st.integers(0, 40), window=st.integers(1, 200),
       seed=st.integers(0, 10_000))
def test_page_lists_are_sinks_chosen_and_window_once_each(lens, sink, window, seed):
    # chosen pages kept from an earlier step may have entered the window since: listed once
    sel = selectors.get("token_select")(sink=sink, window=window, budget=BS, granularity="page", reuse_similarity=None)
    g = torch.Generator().manual_seed(seed)
    plan = BatchPlan.from_lists([1] * len(lens), lens, torch.zeros(len(lens), 64, dtype=torch.int32))
    n_pages = [-(-s // BS) for s in lens]
    lo = -(-sink // BS)
    k = 4
    chosen = torch.full((len(lens), 2, k), 10_000, dtype=torch.int64)
    counts = torch.zeros(len(lens), 2, dtype=torch.int64)
    for b, n in enumerate(n_pages):
        for h in range(2):
            pool = list(range(lo, n))
            pick = sorted(pool[int(i)] for i in torch.randperm(len(pool), generator=g)[: min(k, len(pool))])
            counts[b, h] = int(torch.randint(0, len(pick) + 1, (1,), generator=g))
            chosen[b, h, : len(pick)] = torch.tensor(pick, dtype=torch.int64)
    out = sel._selection((chosen, counts), plan, 2, BS, "cpu")
    for b, (s, n) in enumerate(zip(lens, n_pages)):
        hi = max(max(s - window, 0) // BS, lo)
        for h in range(2):
            want = sorted({p for p in range(n) if p < lo or p >= hi} | set(chosen[b, h, : int(counts[b, h])].tolist()))
            c = int(out.counts[b, h, 0])
            assert out.indices[b, h, 0, :c].tolist() == want


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(1, 900), min_size=1, max_size=4), sink=st.integers(0, 40), window=st.integers(1, 200),
       budget=st.one_of(st.integers(1, 300), st.floats(0.01, 1.0)), hkv=st.sampled_from([1, 2]),
       tied=st.booleans(), seed=st.integers(0, 10_000))
def test_fresh_page_steps_pick_what_score_then_selection_picks(lens, sink, window, budget, hkv, tied, seed):
    """Page granularity without the selection cache takes ``_fresh_pages``, which reads the
    step's bookkeeping from the plan (built by its first layer); it must list exactly the pages
    the general path (``_score``, then ``_selection``) lists, ties included, and a second layer
    of the same step must read the same bookkeeping."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.ones(s, hkv, D) for s in lens] if tied else None  # every page's bounds equal
    cache = Cache(lens, hkv=hkv, seed=seed, keys=keys)
    sel = selectors.get("token_select")(sink=sink, window=window, budget=budget, granularity="page",
                                        reuse_similarity=None)
    ids = [f"r{b}" for b in range(len(lens))]
    step = cache.ctx(torch.zeros(len(lens), 2 * hkv, D), ids, RequestStates())
    for layer in range(2):  # one step's plan: the second layer reads the bookkeeping the first built
        q = torch.randn(len(lens), 2 * hkv, D, generator=g)
        ctx = dataclasses.replace(step, query=q, layer=layer)
        fast = sel.select(ctx)
        general = sel._selection(sel._score(q, ctx, [True] * len(lens)), ctx.plan, hkv, BS, "cpu")
        assert torch.equal(fast.counts, general.counts)
        for b in range(len(lens)):
            for h in range(hkv):
                c = int(fast.counts[b, h, 0])
                assert fast.indices[b, h, 0, :c].tolist() == general.indices[b, h, 0, :c].tolist()
