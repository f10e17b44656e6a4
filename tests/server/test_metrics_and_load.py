"""A ``vllm serve`` with a selecting lcx method and ``PROMETHEUS_MULTIPROC_DIR`` set: lcx's series on
the server's own /metrics carry the values known requests imply; concurrent streams with aborts
leave no error, no hang and gauges back at 0. (The 32-stream, 100-7k-token run is
``./lcx bench load``.)"""
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lcx_plugin.config import LcxConfig
from lcx_plugin.harness.load import mixed_lengths, problems, run_load, token_prompt
from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.server import http_json
from lcx_plugin.metrics import config_hash

from .conftest import METRICS_CONFIG as CONFIG

pytestmark = pytest.mark.slow

KEPT = CONFIG["sink"] + CONFIG["window"]


@pytest.fixture(scope="module")
def metrics_server(servers):
    """The shared streaming server with ``PROMETHEUS_MULTIPROC_DIR`` set (``conftest.py``)."""
    return servers["metrics"]


def scrape(base: str) -> dict[tuple, float]:
    import urllib.request

    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def lcx_value(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_lcx_series_on_the_servers_metrics_match_the_requests_sent(metrics_server):
    shape = json.loads((Path(prepare()) / "config.json").read_text())
    layers, kv_heads, head_dim = shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]
    before = scrape(metrics_server)
    prompts, new = (60, 300, 500), 6
    for i, n in enumerate(prompts):
        status, body = http_json(metrics_server + "/v1/completions", {
            "model": "smollm2", "prompt": token_prompt(n, seed=100 + i), "max_tokens": new, "temperature": 0,
            "ignore_eos": True})
        assert status == 200 and body["usage"]["completion_tokens"] == new, body
    after = scrape(metrics_server)

    def delta(name, **labels):
        return lcx_value(after, name, **labels) - lcx_value(before, name, **labels)

    # One forward per token but the last: contexts P .. P + new - 1 for the newest query.
    contexts = [p + s for p in prompts for s in range(new)]
    per_step = layers * kv_heads
    assert delta("lcx_kv_tokens_held_total", method="streaming") == per_step * sum(contexts)
    assert delta("lcx_kv_tokens_attended_total", method="streaming") == per_step * sum(min(c, KEPT) for c in contexts)
    assert delta("lcx_dense_fallbacks_total", method="streaming", reason="short_context") == \
        sum(c <= KEPT for c in contexts)
    assert delta("lcx_selection_cache_lookups_total", method="streaming") == 0
    (fmt,) = [dict(ls)["format"] for (n, ls) in after if n == "lcx_kv_bytes_per_token"]
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[fmt]
    assert lcx_value(after, "lcx_kv_bytes_per_token") == layers * kv_heads * head_dim * 2 * width
    assert lcx_value(after, "lcx_config_info", method="streaming",
                     hash=config_hash(LcxConfig.from_dict(CONFIG))) == 1
    assert lcx_value(after, "vllm:num_requests_running") == 0  # the engine's own series are still there


def test_concurrent_streams_with_aborts_end_cleanly_and_the_server_recovers(metrics_server):
    result = run_load(metrics_server, "smollm2", mixed_lengths(10, 100, 1000), max_tokens=16, abort_every=5,
                      timeout_s=900)
    assert problems(result) == []
    aborted = [s for s in result["streams"] if s["aborted"]]
    assert len(aborted) == 2 and all(s["completion_tokens"] is None for s in aborted), aborted


def test_load_checker_fails_on_a_short_stream_a_stuck_gauge_and_a_hang():
    ok = {"prompt_tokens": 10, "aborted": False, "events": 4, "completion_tokens": 4, "status": 200, "error": None}
    good = {"streams": [ok], "hung": False, "gauges_after": {}, "settled_s": 0.5, "max_tokens": 4,
            "request_after": dict(ok)}
    assert problems(good) == []
    assert problems({**good, "streams": [{**ok, "completion_tokens": 3}]})
    assert problems({**good, "streams": [{**ok, "status": 500, "error": "boom"}]})
    assert problems({**good, "settled_s": None, "gauges_after": {"vllm:num_requests_running": 1}})
    assert problems({**good, "hung": True})
    assert problems({**good, "request_after": {**ok, "status": 503}})
