"""``token_select`` with ``prefill="select"``: each block of prompt rows selects from its mean query,
against a float64 statement of the method, in batches that mix prompt chunks and decode rows; and
position-neutral scoring (``extrapolate``) against the same statement on un-rotated vectors."""
import pytest
import torch

from lcx_plugin import selectors
from lcx_plugin.kernels.paged import BatchPlan
from lcx_plugin.kernels.paged.rope import Rope
from lcx_plugin.selectors import SelectContext
from lcx_plugin.state import RequestStates

from .test_token_select import BS, D, Cache, Ranked, expected_tokens

HKV = 2


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _ctx(cache: Cache, q_lens: list[int], query: torch.Tensor, rope: Rope | None = None) -> SelectContext:
    plan = BatchPlan.from_lists(q_lens, cache.seq_lens, cache.table)
    return SelectContext(layer=0, query=query, kv=cache.kv, plan=plan, request_ids=tuple(f"r{b}" for b in range(len(q_lens))),
                         num_heads=query.shape[1], pages=cache.pages, requests=RequestStates(), scale=D ** -0.5,
                         rope=rope)


def expected_blocks(keys, rows, first_pos, sel, hkv, granularity="token"):
    """The float64 statement for one prompt chunk: per query block (its rows ``rows`` [qb, Hq, D]
    from position ``first``), the mean row soft-voted over the units up to ``first`` (pages by
    their cached summaries, which hold the chunk's later rows of ``first``'s page too); the
    budget's best units wholly before ``first``'s window and past the sinks; then the units
    between the first and the last row's windows."""
    out = []
    qlen, hq = rows.shape[0], rows.shape[1]
    group = hq // hkv
    for j in range(-(-qlen // sel.query_block)):
        block = rows[j * sel.query_block: (j + 1) * sel.query_block].double()
        first, last = first_pos + j * sel.query_block, first_pos + j * sel.query_block + block.shape[0] - 1
        mean = block.mean(0)  # [Hq, D]
        seen = keys[: first + 1]
        if granularity == "token":
            logits = torch.einsum("hd,thd->ht", mean, seen.repeat_interleave(group, 1)) * D ** -0.5
            units = range(sel.sink, first - sel.window + 1)
            gap = range(max(first - sel.window + 1, sel.sink), last - sel.window + 1)
            k = sel.budget_for(first + 1)
        else:
            n = -(-(first + 1) // BS)
            logits = torch.zeros(hq, n, dtype=torch.float64)
            for p in range(n):
                page = keys[p * BS: (p + 1) * BS]  # the page as cached: a chunk's later rows are in its summary
                lo, hi = page.min(0).values.repeat_interleave(group, 0), page.max(0).values.repeat_interleave(group, 0)
                logits[:, p] = torch.maximum(mean * lo, mean * hi).sum(-1) * D ** -0.5
            lo_page = -(-sel.sink // BS)
            units = range(lo_page, max(lo_page, max(0, first + 1 - sel.window) // BS))
            gap = range(max(max(0, first - sel.window + 1) // BS, lo_page), -(-max(0, last - sel.window + 1) // BS))
            k = -(-sel.budget_for(first + 1) // BS)
        votes = torch.softmax(logits, -1).view(hkv, group, -1).sum(1)
        heads = []
        for g in range(hkv):
            ranked = sorted(units, key=lambda p: (-float(votes[g, p]), p))
            heads.append(Ranked(set(ranked[:k]) | set(gap), votes[g], ranked, k))
        out.append(heads)
    return out  # [block][head] -> units


def _one_chunk(seq_len: int, q_len: int, hq: int, **params):
    """The selection of one prompt chunk (its last ``q_len`` rows) over a fresh random cache."""
    seed = _seed()
    cache = Cache([seq_len], hkv=HKV, seed=seed)
    query = torch.randn(q_len, hq, D, generator=torch.Generator().manual_seed(seed))
    sel = selectors.get("token_select")(reuse_similarity=None, prefill="select", **params)
    return sel.select(_ctx(cache, [q_len], query))


def _lists(sel_out, b, g, qb):
    return sel_out.indices[b, g, qb, : int(sel_out.counts[b, g, qb])].tolist()


@pytest.mark.parametrize("granularity", ["token", "page"])
def test_prompt_chunks_and_decode_rows_in_one_batch_match_the_float64_statement(granularity):
    """A decode row, a chunk after a 550-token prefix and a whole 400-token prompt in one step."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    lens, q_lens, hq = [600, 700, 400], [1, 150, 400], 6
    cache = Cache(lens, hkv=HKV, seed=seed)
    query = torch.randn(sum(q_lens), hq, D, generator=g) * 3
    sel = selectors.get("token_select")(sink=8, window=48, budget=40, reuse_similarity=None, prefill="select",
                                        query_block=64, granularity=granularity)
    ctx = _ctx(cache, q_lens, query)
    assert sel.dense_rows(ctx.plan) == [False, False, False]
    out = sel.select(ctx)
    assert out.query_block == 64 and out.granularity == granularity
    alone = BatchPlan.from_lists([1], lens[:1], cache.table[:1])
    decode_alone = sel.select(SelectContext(layer=0, query=query[:1], kv=cache.kv, plan=alone, request_ids=("r0",),
                                            num_heads=hq, pages=cache.pages, requests=RequestStates(), scale=D ** -0.5))
    for h in range(HKV):  # the decode row gets what it gets alone
        assert _lists(out, 0, h, 0) == _lists(decode_alone, 0, h, 0), f"seed={seed}"
    if granularity == "token":
        assert [_lists(out, 0, h, 0) for h in range(HKV)] == expected_tokens(cache.keys[0], query[0], sel, HKV)
    start = 1
    for b in (1, 2):
        rows = query[start: start + q_lens[b]]
        want = expected_blocks(cache.keys[b], rows, lens[b] - q_lens[b], sel, HKV, granularity)
        for j, heads in enumerate(want):
            for h in range(HKV):
                assert _lists(out, b, h, j) == heads[h], f"seed={seed}: sequence {b} block {j} head {h}"
        start += q_lens[b]
    assert int(out.window[1, 0]) == 48 and int(out.sink[2, 1]) == 8
    assert ctx.requests.counters["prefill_blocks_selected"] == 3 + 7


def test_a_budget_covering_every_unit_leaves_each_prompt_row_its_whole_context():
    """The units between a block's first and last row's windows are listed too: no row sees less
    than dense when the budget covers what is eligible."""
    out = _one_chunk(333, 200, 4, sink=4, window=32, budget=10_000, query_block=48)
    for row in range(200):
        pos = 133 + row
        for h in range(HKV):
            assert out.candidates(0, h, row, pos, BS).tolist() == list(range(pos + 1)), f"row {row} head {h}"


def test_a_small_budget_still_keeps_every_row_its_window_and_sinks():
    out = _one_chunk(500, 300, 2, sink=5, window=20, budget=3, query_block=32)
    for row in range(0, 300, 7):
        pos = 200 + row
        for h in range(HKV):
            cand = set(out.candidates(0, h, row, pos, BS).tolist())
            assert set(range(5)) | set(range(pos - 19, pos + 1)) <= cand
            assert len(cand) <= 5 + 20 + 3 + 31, (row, len(cand))  # sinks, window, budget, the block's gap


def test_position_neutral_scoring_is_the_statement_on_unrotated_vectors():
    """``extrapolate``: keys cached rotated at their positions and queries rotated at theirs select
    what the un-rotated vectors select (decode rows and prompt blocks alike); the rotated products
    would select otherwise."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    rope = Rope.standard(D, theta=500.0)  # short wavelengths: position matters a lot
    lens, q_lens, hq = [500, 420], [1, 160], 4
    raw = [torch.randn(s, HKV, D, generator=g, dtype=torch.float64) for s in lens]
    rotated = [rope.rotate(k, torch.arange(k.shape[0])[:, None]).float() for k in raw]
    cache = Cache(lens, hkv=HKV, seed=seed, keys=rotated)
    q0 = torch.randn(sum(q_lens), hq, D, generator=g, dtype=torch.float64) * 3
    positions = torch.cat([torch.tensor([lens[0] - 1]), torch.arange(lens[1] - q_lens[1], lens[1])])
    query = rope.rotate(q0, positions[:, None]).float()
    sel = selectors.get("token_select")(sink=8, window=40, budget=30, reuse_similarity=None, prefill="select",
                                        query_block=64, extrapolate=True)
    out = sel.select(_ctx(cache, q_lens, query, rope))
    want_decode = expected_tokens(raw[0], q0[0], sel, HKV)
    want_blocks = expected_blocks(raw[1], q0[1:], lens[1] - q_lens[1], sel, HKV)
    for h in range(HKV):
        assert _lists(out, 0, h, 0) == want_decode[h], f"seed={seed}"
        for j, heads in enumerate(want_blocks):
            assert _lists(out, 1, h, j) == heads[h], f"seed={seed}: block {j}"
    plain = selectors.get("token_select")(sink=8, window=40, budget=30, reuse_similarity=None, prefill="select",
                                          query_block=64)
    absolute = plain.select(_ctx(cache, q_lens, query))
    assert any(_lists(absolute, 0, h, 0) != want_decode[h] for h in range(HKV)), f"seed={seed}: rotation had no effect"


def test_prompt_rows_need_prefill_select():
    cache = Cache([300], hkv=HKV)
    sel = selectors.get("token_select")(sink=4, window=16, budget=8)
    assert sel.dense_rows(_ctx(cache, [50], torch.zeros(50, 2, D)).plan) == [True]
    with pytest.raises(ValueError, match="prefills dense unless prefill='select'"):
        sel.select(_ctx(cache, [50], torch.zeros(50, 2, D)))
