"""``vllm serve MODEL --attention-backend lcx`` over real HTTP on 127.0.0.1."""
import os
import re
import subprocess

import pytest

from lcx_plugin.harness.model import prepare

from lcx_plugin.harness.server import free_port, http_json, serve_args

pytestmark = pytest.mark.slow

CHAT = {"model": "smollm2", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def test_serve_with_lcx_answers_an_openai_chat_request_as_stock_does(servers):
    answers = {}
    for name in ("stock", "lcx"):
        status, body = http_json(servers[name] + "/v1/chat/completions", CHAT)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] > 0
        answers[name] = body["choices"][0]["message"]["content"]
    # Dense lcx drives the engine's own op on the same machine: the same greedy answer, whatever it is.
    assert answers["lcx"] == answers["stock"], answers
    log = servers["logs"]["lcx"].read_text()
    assert "Using LCX backend on CPU" in log
    assert "lcx attention active: method=dense kernel=engine" in log


def test_a_malformed_request_gets_a_4xx_and_the_server_keeps_serving(servers):
    base = servers["lcx"]
    status, err = http_json(base + "/v1/chat/completions", {"model": "smollm2", "messages": "not a list"})
    assert 400 <= status < 500, (status, err)
    status, _ = http_json(base + "/v1/chat/completions", {
        "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200


def test_serve_refuses_a_bad_lcx_config_with_one_clear_error():
    """Startup stops with lcx's one message (every other kind of bad config gives its own message
    through the same path: tests/unit/test_config.py)."""
    args = serve_args(str(prepare()), free_port(), {"methdo": "dense"})
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert ("unknown key(s) ['methdo'] for method 'dense'; valid keys are ['kernel', 'kv_format', 'kv_group_size', "
            "'kv_high_fraction', 'method']") in out, out[-3000:]


def _kv_tokens(log: str) -> int:
    found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    assert found, log[-3000:]
    return int(found[-1].replace(",", ""))


def test_serve_with_int8_pages_answers_and_reports_the_larger_capacity(servers):
    """``kv_format: int8`` through ``vllm serve`` (int4 is the README's serve command, run by
    tests/docs): a chat answer over quantized pages, and the KV capacity the server logs, against
    the stock server's at the same VLLM_CPU_KVCACHE_SPACE (a float32 machine's plain pages are
    twice bf16's, so the ratio there is about twice the bf16 one: held to the bf16 bound either way)."""
    status, body = http_json(servers["int8"] + "/v1/chat/completions", CHAT)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] > 0
    log = servers["logs"]["int8"].read_text()
    assert "lcx attention active: method=dense kernel=torch" in log and "kv_format=int8" in log, log[-3000:]
    ratio = _kv_tokens(log) / _kv_tokens(servers["logs"]["stock"].read_text())
    assert ratio >= 1.85, ratio


def _post_raw(url: str, data: bytes) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


BAD_REQUESTS = {
    "empty prompt": {"model": "smollm2", "prompt": "", "max_tokens": 4},
    "empty token list": {"model": "smollm2", "prompt": [], "max_tokens": 4},
    "out-of-vocabulary token ids": {"model": "smollm2", "prompt": [5, 49152 + 7, 11], "max_tokens": 4},
    "negative token id": {"model": "smollm2", "prompt": [5, -3], "max_tokens": 4},
    "too long": {"model": "smollm2", "prompt": [7] * 2100, "max_tokens": 4},
    "negative max_tokens": {"model": "smollm2", "prompt": "Hi", "max_tokens": -1},
}


def test_bad_requests_get_the_same_4xx_from_lcx_as_from_stock(servers):
    """Each bad request gets the stock server's status from the lcx server, never a 5xx, and the
    lcx server answers a good request afterwards."""
    seen = {}
    for name in ("stock", "lcx"):
        codes = {case: http_json(servers[name] + "/v1/completions", body)[0] for case, body in BAD_REQUESTS.items()}
        codes["malformed JSON"] = _post_raw(servers[name] + "/v1/completions", b'{"model": "smollm2", "prompt": ')
        seen[name] = codes
    assert seen["lcx"] == seen["stock"], seen
    assert all(code < 500 for code in seen["lcx"].values()), seen
    assert all(400 <= code < 500 for case, code in seen["lcx"].items() if case != "empty prompt"), seen
    status, body = http_json(servers["lcx"] + "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] > 0, body
