"""``vllm serve MODEL --attention-backend lcx`` over real HTTP on 127.0.0.1."""
import json
import subprocess

import pytest

from lcx_plugin.harness.model import prepare

from .vllm_server import free_port, http_json, served, vllm_executable

pytestmark = pytest.mark.slow


def test_serve_with_lcx_answers_an_openai_chat_request(tmp_path):
    model = str(prepare())
    port = free_port()
    args = [vllm_executable(), "serve", model, "--attention-backend", "lcx",
            "--additional-config", json.dumps({"lcx": {"method": "dense"}}),
            "--enforce-eager", "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "smollm2"]
    log = tmp_path / "serve.log"
    with served(args, log) as base:
        status, body = http_json(base + "/v1/chat/completions", {
            "model": "smollm2", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        })
        assert status == 200, body
        text = body["choices"][0]["message"]["content"]
        assert "Paris" in text, text
        assert body["usage"]["completion_tokens"] > 0
        # A bad request gets a clear 4xx and the server keeps serving.
        status, err = http_json(base + "/v1/chat/completions", {"model": "smollm2", "messages": "not a list"})
        assert 400 <= status < 500, (status, err)
        status, _ = http_json(base + "/v1/chat/completions", {
            "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 200
    text_log = log.read_text()
    assert "Using LCX backend on CPU" in text_log
    assert "lcx attention active: method=dense kernel=engine" in text_log


def test_serve_refuses_a_bad_lcx_config_with_one_clear_error(tmp_path):
    model = str(prepare())
    args = [vllm_executable(), "serve", model, "--attention-backend", "lcx",
            "--additional-config", json.dumps({"lcx": {"methdo": "dense"}}),
            "--enforce-eager", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(free_port())]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "unknown key(s) ['methdo']; valid keys are ['kernel', 'method']" in out, out[-3000:]
