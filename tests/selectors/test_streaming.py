"""``streaming``: sinks and a recent window on every head, dense when short."""
from hypothesis import given, settings
from hypothesis import strategies as st

from lcx_plugin import selectors

from .toy import BS, make_ctx


@settings(max_examples=60, deadline=None)
@given(sink=st.integers(0, 40), window=st.integers(1, 80), min_context=st.integers(0, 200),
       lens=st.lists(st.tuples(st.integers(1, 150), st.integers(0, 20)), min_size=1, max_size=4))
def test_streaming_keeps_sinks_and_window_and_is_dense_when_short(sink, window, min_context, lens):
    seq_lens = [s for s, _ in lens]
    q_lens = [max(1, min(s, q)) for s, q in lens]
    ctx = make_ctx(q_lens, seq_lens)
    sel = selectors.get("streaming")(sink=sink, window=window, min_context=min_context)
    dense = sel.dense_rows(ctx.plan)
    for s, d in zip(seq_lens, dense):
        assert d == (s <= sink + window or s < min_context)
    out = sel.select(ctx)
    for b, (s, q) in enumerate(zip(seq_lens, q_lens)):
        for g in range(ctx.num_kv_heads):
            for row in range(q):
                pos = s - q + row
                cand = set(out.candidates(b, g, row, pos, BS).tolist())
                assert set(range(min(sink, pos + 1))) <= cand  # sinks always kept
                assert set(range(max(0, pos - window + 1), pos + 1)) <= cand  # the window always kept
                assert all(p <= pos for p in cand)  # never the future
                assert len(cand) == len(set(range(min(sink, pos + 1))) | set(range(max(0, pos - window + 1), pos + 1)))
                if pos + 1 <= sink + window:
                    assert cand == set(range(pos + 1))  # a budget >= the context is everything


def test_streaming_selection_is_built_once_per_step():
    ctx = make_ctx([1, 1], [500, 900])
    sel = selectors.get("streaming")(sink=4, window=64)
    first = sel.select(ctx)
    ctx.layer = 7
    assert sel.select(ctx) is first  # every layer of the step shares it (and the kernels' prep)
    assert int(first.sink[1, 0]) == 4 and int(first.window[0, 1]) == 64 and not bool(first.dense.any())
