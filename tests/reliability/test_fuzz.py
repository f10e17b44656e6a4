"""Fuzz (hypothesis): the config parser, the head-pattern loader and every registered selector, on
generated inputs. Bad input must give one LcxConfigError, never another exception; every selector's
output must satisfy the selection invariants and never read outside a sequence's context (the
cache's unowned slots hold NaN, so such a read poisons the output)."""
from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lcx_plugin import head_patterns, selectors
from lcx_plugin.config import LcxConfig, resolve_config
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.head_patterns import ModelShape
from lcx_plugin.kernels.paged import BatchPlan
from lcx_plugin.layer import LayerCore, plan_step
from lcx_plugin.selectors import LayerInfo, WindowedSelector

from ..kernels.paged_cases import empty_format

KEYS = sorted({f.name for n in selectors.names() for f in selectors.get(n).params()}
              | {"method", "kernel", "kv_format", "group_size", "kv_group_size", "kv_high_fraction"})
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.sampled_from(selectors.names()))
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                       max_leaves=6)
CONFIGS = st.one_of(JSONISH, st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), JSONISH, max_size=6),
                    st.builds(lambda m, rest: {"method": m, **rest}, st.sampled_from(selectors.names()),
                              st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=5)))


@settings(max_examples=300, deadline=None)
@given(CONFIGS)
def test_any_config_is_parsed_or_refused_with_one_clear_error(raw):
    try:
        config = LcxConfig.from_dict(raw)
    except LcxConfigError as e:
        assert str(e).startswith("lcx config"), str(e)
        return
    assert LcxConfig.from_dict(config.to_dict()) == config  # what parses, round-trips


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=40), CONFIGS.map(json.dumps)))
@example("~x")  # a home directory of an unknown user: pathlib raises RuntimeError (found by this test in CI)
@example("~nosuchuser/lcx.json")
@example("~\x00")  # a NUL byte in the user name: ValueError from the user lookup (found by this test in CI)
def test_any_lcx_config_environment_value_is_parsed_or_refused(raw):
    try:
        resolve_config({}, {"LCX_CONFIG": raw})
    except LcxConfigError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.lists(st.lists(st.floats(allow_nan=True), max_size=4), max_size=4)
                      .map(lambda m: json.dumps({"scores": m}).encode()),
                      st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=False), min_size=1, max_size=4),
                               min_size=1, max_size=4)
                      .map(lambda m: "\n".join("\t".join(repr(x) for x in r) for r in m).encode())),
       suffix=st.sampled_from([".json", ".tsv"]))
def test_any_head_pattern_file_loads_or_is_refused_with_one_clear_error(tmp_path, data, suffix):
    path = tmp_path / f"pattern{suffix}"
    path.write_bytes(data)
    try:
        pattern = head_patterns.load(path)
    except LcxConfigError as e:
        assert "head pattern" in str(e), str(e)
        return
    assert pattern.num_layers >= 1 and pattern.num_kv_heads >= 1


# -- every selector on generated batches ---------------------------------------------------------
BS, HKV, HQ, D, LAYERS = 16, 2, 4, 16, 2


#: Modes a method's short-context example does not reach, fuzzed as rows of their own.
VARIANTS = {"token_select+prefill_select": ("token_select", {"prefill": "select", "query_block": 32}),
            "token_select+prefill_select+page": ("token_select", {"prefill": "select", "granularity": "page"})}


def _config(row: str, tmp_path) -> LcxConfig:
    name, extra = VARIANTS.get(row, (row, {}))
    params = {f.name for f in selectors.get(name).params()}
    raw = {"method": name, **selectors.get(name).short_context_example, **extra}
    if "pattern" in params:
        pattern = head_patterns.random_pattern(ModelShape(LAYERS, HKV, D), seed=3)
        raw["pattern"] = str(pattern.save(tmp_path / f"{name}-pattern.json"))
    return LcxConfig.from_dict(raw)


def _check(sel, plan: BatchPlan, selector) -> None:
    b, h, nqb, width = sel.indices.shape
    assert b == plan.num_seqs and h == HKV
    for s in range(b):
        units = plan.lens[s] if sel.granularity == "token" else -(-plan.lens[s] // BS)
        own = plan.lens[s] - 1  # the last query row's own position: it always attends to itself
        own_unit = own if sel.granularity == "token" else own // BS
        last_block = (plan.q_len(s) - 1) // sel.query_block if sel.query_block else 0
        for g in range(h):
            n = int(sel.counts[s, g, last_block])
            assert (sel.dense[s, g] or sel.window[s, g] >= 1 or own_unit in sel.indices[s, g, last_block, :n].tolist()), \
                "the last query does not attend to its own token"
            if isinstance(selector, WindowedSelector) and not sel.dense[s, g] and sel.sink[s, g] == 0 and selector.sink:
                assert 0 in sel.indices[s, g, 0, :int(sel.counts[s, g, 0])].tolist(), "the sinks were dropped"
            for q in range(nqb):
                n = int(sel.counts[s, g, q])
                assert 0 <= n <= width
                idx = sel.indices[s, g, q, :n]
                assert bool((idx >= 0).all()) and bool((idx < units).all()), (idx, units)
                assert bool((idx[1:] > idx[:-1]).all()), f"indices not ascending and unique: {idx}"


@pytest.mark.parametrize("name", [*selectors.names(), *VARIANTS])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seqs=st.lists(st.tuples(st.integers(1, 700), st.integers(1, 3), st.booleans()), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_every_selector_on_generated_batches_stays_in_range_and_in_context(tmp_path, name, seqs, seed):
    """Each sequence: a context length, and a decode step or a chunk of up to 3 x 64 rows."""
    config = _config(name, tmp_path)
    g = torch.Generator().manual_seed(seed)
    seq_lens = [n for n, _, _ in seqs]
    q_lens = [1 if decode else min(n, 64 * k) for n, k, decode in seqs]
    pages = [-(-s // BS) for s in seq_lens]
    num_blocks = sum(pages) + 2
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(seqs), max(pages)), num_blocks - 1, dtype=torch.int32)
    kv = empty_format("plain", num_blocks, HKV, BS, D, torch.float32)  # unowned slots: NaN
    core = LayerCore(1, HQ, HKV, D, D ** -0.5, config, "torch", info=LayerInfo(1, HKV, D, ModelShape(LAYERS, HKV, D)))
    used = 0
    for b, (s, n) in enumerate(zip(seq_lens, pages)):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
        slots = table[b, torch.arange(s) // BS].long() * BS + torch.arange(s) % BS
        core.write(kv, torch.randn(s, HKV, D, generator=g), torch.randn(s, HKV, D, generator=g), slots)
    plan = BatchPlan.from_lists(q_lens, seq_lens, table)
    query = torch.randn(sum(q_lens), HQ, D, generator=g)
    seen = []
    cls = type(config.selector)
    original = cls.select

    def recording(self, ctx):
        sel = original(self, ctx)
        if sel is not None:
            seen.append((sel, ctx.plan))
        return sel

    ids = tuple(f"req{i}" for i in range(len(seqs)))
    with mock.patch.object(cls, "select", recording):
        step = plan_step(config.selector, plan, ids)
        out = core.run(query, kv, step, torch.full_like(query, math.nan))
    assert not torch.isnan(out).any(), "a row read outside its context (or was never written)"
    for sel, sub in seen:
        _check(sel, sub, config.selector)
