"""Selectors: the registry, the shared base (window, dense threshold, budgets, top-k) and every
registered method, on hand-made cases and hypothesis properties. Parametrized over the registry,
so a new method is covered here without a new test."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcx_plugin import selectors
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.selectors import TopKSelector, WindowedSelector, top_k

from .toy import BS, make_ctx


def test_registry_lists_every_method_and_refuses_duplicates():
    assert {"dense", "streaming"} <= set(selectors.names())
    with pytest.raises(LcxConfigError, match="is not one of"):
        selectors.get("nope")

    @dataclass(frozen=True)
    class Impostor(WindowedSelector):
        name: ClassVar[str] = "streaming"

        def select(self, ctx):
            return None

    with pytest.raises(TypeError, match="is taken by"):
        selectors.register(Impostor)


@pytest.mark.parametrize("name", selectors.names())
def test_every_method_builds_from_its_defaults_and_round_trips(name):
    cls = selectors.get(name)
    sel = cls.from_dict({})
    assert cls.from_dict(sel.to_dict()) == sel
    with pytest.raises(LcxConfigError, match=rf"unknown key\(s\) \['zzz'\] for method '{name}'"):
        cls.from_dict({"zzz": 1})


@pytest.mark.parametrize("name", selectors.names())
def test_every_method_is_dense_when_its_budget_covers_the_context(name):
    """A context shorter than what a method keeps needs no selection."""
    cls = selectors.get(name)
    sel = cls.from_dict({})
    plan = make_ctx([5, 1], [5, 40]).plan
    if isinstance(sel, WindowedSelector):
        sel = cls.from_dict({"sink": 4, "window": 40})
    assert sel.dense_rows(plan) == [True, True]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(0, 70), seed=st.integers(0, 10_000), p=st.floats(0.0, 1.0))
def test_top_k_is_sorted_unique_in_range_and_best(n, k, seed, p):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, n, generator=g)
    eligible = torch.rand(3, n, generator=g) < p
    idx, counts = top_k(scores, k, eligible)
    for r in range(3):
        c = int(counts[r])
        assert c == min(k, int(eligible[r].sum()))
        got = idx[r, :c].tolist()
        assert got == sorted(set(got)) and all(0 <= i < n and eligible[r, i] for i in got)
        if c:  # nothing eligible left out scores higher than the worst kept
            worst = scores[r, got].min()
            rest = [i for i in range(n) if eligible[r, i] and i not in got]
            assert all(scores[r, i] <= worst for i in rest)


def test_top_k_budget_as_count_or_fraction():
    @dataclass(frozen=True)
    class Probe(TopKSelector):
        name: ClassVar[str] = "probe-topk"

        def select(self, ctx):
            return None

    assert Probe(budget=10).budget_for(100) == 10 and Probe(budget=10).budget_for(4) == 4
    assert Probe(budget=0.25).budget_for(100) == 25 and Probe(budget=1.0).budget_for(7) == 7
    for bad, msg in ((0, "as a count must be >= 1"), (1.5, r"as a fraction must be in \(0, 1\]"), (0.0, "fraction")):
        with pytest.raises(LcxConfigError, match=msg):
            Probe(budget=bad)


@dataclass(frozen=True)
class _Wrapper(WindowedSelector):
    """A toy wrapper: its own window on KV head 0, the inner method's choice on the others."""

    name: ClassVar[str] = "test-wrapper"
    inner: selectors.Selector = None  # type: ignore[assignment]

    def prepare_layer(self, layer):
        return {"layer": layer.index, "heads": layer.num_kv_heads}

    def select(self, ctx):
        return self.inner.select(ctx)


def test_composition_builds_the_inner_method_from_its_own_object():
    w = _Wrapper.from_dict({"sink": 2, "inner": {"method": "streaming", "window": 16}})
    assert w.inner == selectors.get("streaming")(window=16)
    assert w.to_dict() == {"sink": 2, "window": 1024, "min_context": 0, "extrapolate": False,
                           "inner": {"method": "streaming", "sink": 64, "window": 16, "min_context": 0,
                                     "extrapolate": False}}
    with pytest.raises(LcxConfigError, match=r"\(inner\): unknown key\(s\) \['windw'\]"):
        _Wrapper.from_dict({"inner": {"method": "streaming", "windw": 16}})
    with pytest.raises(LcxConfigError, match='inner needs a "method"'):
        _Wrapper.from_dict({"inner": {"window": 16}})
    with pytest.raises(LcxConfigError, match="inner=3 must be an object"):
        _Wrapper.from_dict({"inner": 3})


def test_per_layer_data_is_built_once_per_layer_core():
    from lcx_plugin.config import LcxConfig
    from lcx_plugin.layer import LayerCore

    cfg = LcxConfig(selector=_Wrapper.from_dict({"inner": {"method": "dense"}}))
    core = LayerCore(5, 4, 2, 16, 0.25, cfg, "torch")
    assert core.layer_data == {"layer": 5, "heads": 2}
