"""Real ``vllm serve`` processes shared by the server tests, started together: stock; lcx dense;
lcx dense over int8 pages; and lcx streaming with ``PROMETHEUS_MULTIPROC_DIR`` set, whose /metrics
the metrics tests read. A start-up is mostly vLLM importing itself in three processes, which is
compute on 2 cores: the four together took 100 s, against about 110 s for two together, then
the other two one at a time."""
from __future__ import annotations

import pytest

from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.server import free_ports, serve_args, served_together

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
    with served_together([(serve_args(model, port, lcx), logs[name], env.get(name, {}))
                          for port, (name, lcx) in zip(ports, ARMS.items())]) as urls:
        yield {**dict(zip(ARMS, urls)), "logs": logs}
