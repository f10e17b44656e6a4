"""``head_split``: streaming heads keep sinks + window, retrieval heads keep everything (or the inner
method's choice), from a head pattern; the selection runs exactly in the kernels."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcx_plugin import selectors
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.head_patterns import HeadPattern, ModelShape
from lcx_plugin.kernels.paged import paged_attention
from lcx_plugin.kernels.paged.reference import paged_attention_reference
from lcx_plugin.selectors import LayerInfo

from ..kernels.paged_cases import make_problem
from .toy import BS, make_ctx

HeadSplit = selectors.get("head_split")


@pytest.fixture
def pattern_file(tmp_path):
    """2 layers x 3 KV heads: at fraction 0.5 (2 of 3 per layer), layer 0 streams heads 0 and 2, layer 1
    heads 1 and 2."""
    scores = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.05, 0.7]], dtype=torch.float64)
    return str(HeadPattern(scores, ModelShape(2, 3, 16, "toy")).save(tmp_path / "toy.json"))


def _info(layer, hkv=3, offset=0, total=3):
    return LayerInfo(layer, hkv, 16, ModelShape(2, total, 16, "toy"), offset)


def test_pattern_picks_streaming_heads_per_layer_and_per_rank(pattern_file):
    sel = HeadSplit(pattern=pattern_file, streaming_fraction=0.5)
    assert sel.prepare_layer(_info(0)).streaming_heads == [0, 2]
    assert sel.prepare_layer(_info(1)).streaming_heads == [1, 2]
    assert HeadSplit(pattern=pattern_file, streaming_fraction=0.34).prepare_layer(_info(1)).streaming_heads == [1]
    # Tensor parallelism: a rank holding KV heads 1..2 of layer 0 sees its own slice.
    assert sel.prepare_layer(_info(0, hkv=2, offset=1)).key == (False, True)
    assert HeadSplit(pattern=pattern_file, threshold=0.75).prepare_layer(_info(1)).streaming_heads == [1, 2]


def test_only_a_fraction_split_is_stored_apart(pattern_file):
    """A threshold may stream a different number of heads per layer (here 2 in layer 1, and in
    layer 0 whatever falls below it): such a split is applied as a selection only and keeps the
    engine's prefix-cache hits; a fraction split is stored apart unless save_memory is off."""
    assert HeadSplit(pattern=pattern_file, streaming_fraction=0.5).stores_apart
    assert not HeadSplit(pattern=pattern_file, streaming_fraction=0.5, save_memory=False).stores_apart
    by_threshold = HeadSplit(pattern=pattern_file, threshold=0.75)
    assert not by_threshold.stores_apart and by_threshold.prefix_cache_hits()
    assert not HeadSplit(pattern=pattern_file).prefix_cache_hits()  # the default fraction is stored apart


def test_a_pattern_for_another_model_is_one_clear_startup_error(pattern_file):
    sel = HeadSplit(pattern=pattern_file)
    assert sel.check_model(ModelShape(2, 3, 16)) == []
    (why,) = sel.check_model(ModelShape(30, 3, 64, "SmolLM2-135M-Instruct"))
    assert "does not fit the served model" in why and "2 layers x 3 KV heads" in why and "head_dim 16" in why
    (why,) = HeadSplit().check_model(ModelShape(2, 3, 16, "unknown-model"))
    assert "no shipped pattern for model 'unknown-model'" in why and "lcx calibrate" in why


def test_config_errors():
    with pytest.raises(LcxConfigError, match="not both"):
        HeadSplit.from_dict({"streaming_fraction": 0.5, "threshold": 0.1})
    with pytest.raises(LcxConfigError, match=r"streaming_fraction=1.5 must be in \[0, 1\]"):
        HeadSplit.from_dict({"streaming_fraction": 1.5})
    with pytest.raises(LcxConfigError, match="cannot nest another head_split"):
        HeadSplit.from_dict({"retrieval": {"method": "head_split"}})
    inner = HeadSplit.from_dict({"retrieval": {"method": "streaming", "window": 512}})
    assert inner.retrieval == selectors.get("streaming")(window=512)


def _ctx(q_lens, seq_lens, split):
    ctx = make_ctx(q_lens, seq_lens, hkv=3, hq=6)
    ctx.layer_data = split
    return ctx


@settings(max_examples=50, deadline=None)
@given(sink=st.integers(0, 20), window=st.integers(1, 40), layer=st.integers(0, 1),
       lens=st.lists(st.tuples(st.integers(1, 120), st.integers(1, 20)), min_size=1, max_size=3))
def test_sinks_and_window_always_kept_and_retrieval_heads_see_everything(tmp_path_factory, sink, window, layer, lens):
    path = tmp_path_factory.mktemp("p") / "toy.json"
    if not path.exists():
        HeadPattern(torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.05, 0.7]], dtype=torch.float64),
                    ModelShape(2, 3, 16, "toy")).save(path)
    sel = HeadSplit(pattern=str(path), sink=sink, window=window, streaming_fraction=0.5)
    split = sel.prepare_layer(_info(layer))
    seq_lens = [s for s, _ in lens]
    q_lens = [min(s, q) for s, q in lens]
    ctx = _ctx(q_lens, seq_lens, split)
    assert sel.dense_rows(ctx.plan) == [s <= sink + window for s in seq_lens]
    out = sel.select(ctx)
    for b, (s, q) in enumerate(zip(seq_lens, q_lens)):
        for g in range(3):
            for row in range(q):
                pos = s - q + row
                cand = set(out.candidates(b, g, row, pos, BS).tolist())
                if split.key[g]:
                    want = set(range(min(sink, pos + 1))) | set(range(max(0, pos - window + 1), pos + 1))
                    assert cand == want
                    if pos + 1 <= sink + window:  # a window covering the context is dense
                        assert cand == set(range(pos + 1))
                else:
                    assert cand == set(range(pos + 1))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mixed_heads_are_exact_against_the_float64_reference(pattern_file, impl):
    """Windows straddling page boundaries (window 11 on 8-token pages), a sequence shorter than
    sink + window, a chunked prefill and decodes, one selection per layer's split."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    seq_lens, q_lens = [37, 70, 12, 29], [9, 1, 12, 1]
    problem = make_problem(seq_lens, q_lens, 6, 3, head_dim=16, block_size=8, seed=seed)
    sel = HeadSplit(pattern=pattern_file, sink=5, window=11, streaming_fraction=0.5)
    for layer in (0, 1):
        split = sel.prepare_layer(_info(layer))
        ctx = _ctx(q_lens, seq_lens, split)
        ctx.query, ctx.kv, ctx.plan = problem.query, problem.kv, problem.plan
        selection = sel.select(ctx)
        assert selection.dense.tolist() == [[not s for s in split.key]] * 4
        want = paged_attention_reference(problem.query, problem.kv, problem.plan, problem.scale, selection)
        out = torch.full_like(problem.query, float("nan"))
        paged_attention(problem.query, problem.kv, problem.plan, problem.scale, out, selection, impl=impl)
        assert (out.double() - want).abs().max() < 2e-4, f"seed={seed} layer={layer}"


def test_all_streaming_is_the_shared_window_and_none_streaming_is_dense(pattern_file):
    ctx = _ctx([1, 1], [90, 120], None)
    sel = HeadSplit(pattern=pattern_file, sink=4, window=16, streaming_fraction=1.0)
    ctx.layer_data = sel.prepare_layer(_info(0))
    assert sel.select(ctx) is selectors.get("streaming")(sink=4, window=16).select(ctx)
    sel = HeadSplit(pattern=pattern_file, sink=4, window=16, streaming_fraction=0.0)
    ctx.layer_data = sel.prepare_layer(_info(0))
    assert sel.select(ctx) is None
