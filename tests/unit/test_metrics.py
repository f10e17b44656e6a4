"""lcx's /metrics series: the attended count against the selection's own definition, and the
series written through prometheus-client's multiprocess files as a server's /metrics reads them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lcx_plugin.kernels.paged import BatchPlan, Selection
from lcx_plugin.metrics import attended_by_newest


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("granularity", ["page", "token"])
def test_attended_by_newest_counts_each_candidate_of_the_newest_row_once(seed, granularity):
    g = torch.Generator().manual_seed(seed)
    bs, b, h = 16, 4, 3
    seq_lens = torch.randint(1, 200, (b,), generator=g).tolist()
    q_lens = [int(torch.randint(1, n + 1, (1,), generator=g)) for n in seq_lens]
    plan = BatchPlan.from_lists(q_lens, seq_lens, torch.zeros(b, 13, dtype=torch.int32))
    query_block = 16 if seed % 2 else 0
    nqb = max(-(-q // query_block) for q in q_lens) if query_block else 1
    units = 13 if granularity == "page" else 200
    width = 9
    indices = torch.stack([torch.randperm(units, generator=g)[:width].sort().values
                           for _ in range(b * h * nqb)]).view(b, h, nqb, width)
    counts = torch.randint(0, width + 1, (b, h, nqb), generator=g)
    sel = Selection.build(b, h, granularity=granularity, indices=indices, counts=counts,
                          sink=torch.randint(0, 20, (b, h), generator=g), window=torch.randint(0, 40, (b, h), generator=g),
                          dense=torch.rand(b, h, generator=g) < 0.2, query_block=query_block)
    got = attended_by_newest(plan, sel, bs)
    want = torch.tensor([[len(sel.candidates(i, k, q_lens[i] - 1, seq_lens[i] - 1, bs)) for k in range(h)]
                         for i in range(b)])
    assert torch.equal(got, want), (got, want)
    assert torch.equal(attended_by_newest(plan, None, bs), torch.tensor(seq_lens)[:, None])


SCRIPT = """
import json, sys
from prometheus_client import CollectorRegistry, multiprocess
from lcx_plugin.config import LcxConfig
from lcx_plugin.kernels.paged import BatchPlan, Selection
from lcx_plugin.layer import StepPlan
from lcx_plugin.metrics import Metrics, config_hash, dense_fallbacks
import torch

config = LcxConfig.from_dict({"method": "streaming", "sink": 4, "window": 8})
m = Metrics(config)
plan = BatchPlan.from_lists([1, 1], [30, 10], torch.zeros(2, 2, dtype=torch.int32))
m.attention(plan, 3, Selection.build(2, 3, sink=4, window=8))  # held 40*3, attended (12 + 10)*3
assert dense_fallbacks(StepPlan(plan, ("a", "b"), [False, True]), config.selector, m) == {"short_context": 1}
m.counters({"selection_lookups": 5, "selection_hits": 2})
m.counters({"selection_lookups": 7, "selection_hits": 3, "hip_searches": 1})
m.layer_bytes(0, "bfloat16", 100.0)
m.layer_bytes(1, "bfloat16", 100.0)
m.layer_bytes(1, "bfloat16", 50.0)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
out = {s.name + json.dumps(s.labels, sort_keys=True): s.value
       for fam in registry.collect() for s in fam.samples}
print(json.dumps({"samples": out, "hash": config_hash(config)}))
"""


def test_series_reach_a_multiprocess_registry_with_the_values_recorded(tmp_path):
    """The worker's path to /metrics: values written in one process, read back from the directory."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    s = got["samples"]
    m = '{"method": "streaming"}'
    assert s["lcx_kv_tokens_held_total" + m] == 120
    assert s["lcx_kv_tokens_attended_total" + m] == 66
    assert s["lcx_selection_cache_lookups_total" + m] == 8  # 7 token-select lookups + 1 HiP search
    assert s["lcx_selection_cache_hits_total" + m] == 3
    assert s['lcx_dense_fallbacks_total{"method": "streaming", "reason": "short_context"}'] == 1
    assert s['lcx_kv_bytes_per_token{"format": "bfloat16"}'] == 150
    info = json.dumps({"hash": got["hash"], "kernel": "auto", "kv_format": "auto", "method": "streaming"},
                      sort_keys=True)
    assert s["lcx_config_info" + info] == 1


def test_dense_fallbacks_are_counted_by_reason_and_a_dense_method_has_none(caplog):
    from lcx_plugin.config import LcxConfig
    from lcx_plugin.layer import StepPlan
    from lcx_plugin.metrics import dense_fallbacks

    selector = LcxConfig.from_dict({"method": "token_select", "sink": 4, "window": 8, "budget": 8}).selector
    plan = BatchPlan.from_lists([5, 1, 1], [5, 12, 400], torch.zeros(3, 4, dtype=torch.int32))
    step = StepPlan(plan, ("a", "b", "c"), selector.dense_rows(plan))
    assert step.dense_rows == [True, True, False]
    assert dense_fallbacks(step, selector, None) == {"prefill": 1, "short_context": 1}
    dense = LcxConfig.from_dict({"method": "dense"}).selector
    assert dense_fallbacks(StepPlan(plan, ("a", "b", "c"), [True] * 3), dense, None) == {}
