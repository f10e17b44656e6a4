"""``lcx ab`` end to end against two real local ``vllm serve`` processes (stock and dense lcx)."""
import json
import subprocess
import sys

import pytest

from lcx_plugin.harness.model import prepare

pytestmark = pytest.mark.slow


def test_ab_against_two_servers_writes_report_and_plots(servers, tmp_path):
    out = tmp_path / "report" / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lcx_plugin.cli", "ab", "--arm-a", servers["stock"], "--arm-b", servers["lcx"] + "/v1",
         "--tokenizer", str(prepare()), "--tasks", "passkey,cwe", "--lengths", "384", "--depths", "0.5",
         "--accuracy-concurrency", "1", "--load-requests", "3", "--load-concurrency", "2",
         "--load-prompt-tokens", "256", "--load-max-tokens", "8", "--max-model-len", "2048", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["accuracy"]["overall"]["n"] == 2
    # One accuracy request at a time: each server schedules it alone, so dense lcx (the engine's own
    # op) answers exactly as stock does.
    a, b = report["raw"]["A"]["samples"], report["raw"]["B"]["samples"]
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert all(r["output"] for r in a), a
    for side in "AB":
        assert report["arms"][side]["kind"] == "endpoint"
        assert report["kv_capacity_tokens"][side] and report["kv_capacity_tokens"][side] > 1000
        assert len(report["raw"][side]["load"]["requests"]) == 3
        assert report["latency"][side]["ttft_s"]["p50"]["value"] > 0
    for png in ("ab_needle_heatmap.png", "ab_latency_cdf.png"):  # <out stem>_...
        data = (out.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_endpoint_arms_fit_prompts_with_the_served_tokenizer(servers, tmp_path):
    """Without --tokenizer, prompts are fitted with the server's own /tokenize route."""
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lcx_plugin.cli", "ab", "--arm-a", servers["stock"], "--arm-b", servers["lcx"],
         "--tasks", "passkey", "--lengths", "300", "--depths", "0.5", "--load-requests", "1",
         "--load-prompt-tokens", "256", "--load-max-tokens", "2", "--max-model-len", "2048", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "own tokenizer (/tokenize" in proc.stderr
    sample = json.loads(out.read_text())["raw"]["A"]["samples"][0]
    assert abs(sample["prompt_tokens"] - 300) <= 32
