"""Real ``vllm serve`` processes shared by the server tests, started together: stock; lcx dense;
lcx dense over int8 pages; and lcx streaming with ``PROMETHEUS_MULTIPROC_DIR`` set, whose /metrics
the metrics tests read. A start-up is mostly vLLM importing itself in three processes, which is
compute on 2 cores: the four together took 100 s, against about 110 s for two together, then
the other two one at a time. They serve in the dtype the machine's settings choose (``lcx
machine``), as the engine tests run: on an AVX2-only CPU that is float32, where the model's own
bfloat16 is emulated (there, 10 streams of 100-1,000 tokens took 98 s in bfloat16 against 17 s in
float32 on a fresh server.)"""
from __future__ import annotations

import pytest

from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.server import free_ports, serve_args, served_together
from lcx_plugin.harness.settings import choose

#: The metrics server's config (tests/server/test_metrics_and_load.py).
METRICS_CONFIG = {"method": "streaming", "sink": 16, "window": 128}
ARMS = {"stock": None, "lcx": {"method": "dense"}, "int8": {"method": "dense", "kv_format": "int8"},
        "metrics": METRICS_CONFIG}


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """``{name: url for each of ARMS, "logs": {name: path}}``, all up for the whole session."""
    model = str(prepare())
    tmp = tmp_path_factory.mktemp("servers")
    (tmp / "prom").mkdir()
    logs = {name: tmp / f"{name}.log" for name in ARMS}
    env = {"metrics": {"PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom")}}
    ports = free_ports(len(ARMS))
    dtype = choose().dtype
    with served_together([(serve_args(model, port, lcx, dtype=dtype), logs[name], env.get(name, {}))
                          for port, (name, lcx) in zip(ports, ARMS.items())]) as urls:
        yield {**dict(zip(ARMS, urls)), "logs": logs}
