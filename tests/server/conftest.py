"""Two real ``vllm serve`` processes shared by the server tests: stock, and lcx (dense)."""
from __future__ import annotations

from contextlib import ExitStack

import pytest

from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.server import free_port, serve_args, served


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """``{"stock": url, "lcx": url, "logs": {name: path}}``, both up for the whole session."""
    model = str(prepare())
    tmp = tmp_path_factory.mktemp("servers")
    with ExitStack() as stack:
        urls = {name: stack.enter_context(served(serve_args(model, free_port(), lcx), tmp / f"{name}.log"))
                for name, lcx in (("stock", None), ("lcx", {"method": "dense"}))}
        yield {**urls, "logs": {name: tmp / f"{name}.log" for name in urls}}
