"""``lcx ab`` end to end against two real local ``vllm serve`` processes (stock and lcx)."""
import json
import subprocess
import sys
from contextlib import ExitStack

import pytest

from lcx_plugin.harness.model import prepare

from .vllm_server import free_port, served, vllm_executable

pytestmark = pytest.mark.slow


def _serve_args(model, port, lcx: bool):
    args = [vllm_executable(), "serve", model, "--enforce-eager", "--max-model-len", "2048",
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2"]
    return args + (["--attention-backend", "lcx", "--additional-config", '{"lcx": {"method": "dense"}}'] if lcx else [])


def test_ab_against_two_servers_writes_report_and_plots(tmp_path):
    model = str(prepare())
    with ExitStack() as stack:
        stock = stack.enter_context(served(_serve_args(model, free_port(), False), tmp_path / "stock.log"))
        lcx = stack.enter_context(served(_serve_args(model, free_port(), True), tmp_path / "lcx.log"))
        out = tmp_path / "report" / "ab.json"
        proc = subprocess.run(
            [sys.executable, "-m", "lcx_plugin.cli", "ab", "--arm-a", stock, "--arm-b", lcx + "/v1",
             "--tokenizer", model, "--tasks", "passkey,cwe", "--lengths", "384", "--depths", "0.5",
             "--load-requests", "3", "--load-concurrency", "2", "--load-prompt-tokens", "256",
             "--load-max-tokens", "8", "--max-model-len", "2048", "--out", str(out)],
            capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    overall = report["accuracy"]["overall"]
    assert overall["n"] == 2 and 0.0 <= overall["mcnemar"]["p_value"] <= 1.0
    for side in "AB":
        assert report["arms"][side]["kind"] == "endpoint"
        assert report["kv_capacity_tokens"][side] and report["kv_capacity_tokens"][side] > 1000
        assert len(report["raw"][side]["load"]["requests"]) == 3
        assert report["latency"][side]["ttft_s"]["p50"]["value"] > 0
    for side in "AB":
        assert all(r["output"] for r in report["raw"][side]["samples"]), report["raw"][side]["samples"]
    for png in ("ab_needle_heatmap.png", "ab_latency_cdf.png"):  # <out stem>_...
        data = (out.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "lcx attention active" in (tmp_path / "lcx.log").read_text()
