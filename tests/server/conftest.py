"""Two real ``vllm serve`` processes shared by the server tests: stock, and lcx (dense), started
together."""
from __future__ import annotations

import pytest

from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.server import free_ports, serve_args, served_together


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """``{"stock": url, "lcx": url, "logs": {name: path}}``, both up for the whole session."""
    model = str(prepare())
    tmp = tmp_path_factory.mktemp("servers")
    arms = {"stock": None, "lcx": {"method": "dense"}}
    logs = {name: tmp / f"{name}.log" for name in arms}
    ports = free_ports(len(arms))
    with served_together([(serve_args(model, port, lcx), logs[name])
                          for port, (name, lcx) in zip(ports, arms.items())]) as urls:
        yield {**dict(zip(arms, urls)), "logs": logs}
