"""Two real ``vllm serve`` processes shared by the server tests: stock, and lcx (dense)."""
from __future__ import annotations

import json
from contextlib import ExitStack

import pytest

from lcx_plugin.harness.model import prepare

from .vllm_server import free_port, served, vllm_executable

MAX_MODEL_LEN = "2048"


def serve_args(model: str, port: int, lcx: dict | None) -> list[str]:
    args = [vllm_executable(), "serve", model, "--enforce-eager", "--max-model-len", MAX_MODEL_LEN,
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2"]
    if lcx is not None:
        args += ["--attention-backend", "lcx", "--additional-config", json.dumps({"lcx": lcx})]
    return args


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """``{"stock": url, "lcx": url, "logs": {name: path}}``, both up for the whole session."""
    model = str(prepare())
    tmp = tmp_path_factory.mktemp("servers")
    with ExitStack() as stack:
        urls = {name: stack.enter_context(served(serve_args(model, free_port(), lcx), tmp / f"{name}.log"))
                for name, lcx in (("stock", None), ("lcx", {"method": "dense"}))}
        yield {**urls, "logs": {name: tmp / f"{name}.log" for name in urls}}
