"""Load and abort against a running OpenAI-compatible vLLM server.

``run_load`` sends concurrent streaming completions of mixed lengths (token-id prompts, greedy,
``ignore_eos`` so every finished stream has exactly ``max_tokens`` tokens), cancels every
``abort_every``-th stream after a few tokens by closing its connection, then watches the
server's own gauges (running, waiting, KV usage) return to 0 and sends one more request. The
result is plain data; tests and ``bench/load.py`` judge it.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def mixed_lengths(n: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """``n`` prompt lengths spread log-uniformly over [shortest, longest], ends included, shuffled."""
    if n == 1:
        return [shortest]
    ratio = (longest / shortest) ** (1 / (n - 1))
    lengths = [round(shortest * ratio ** i) for i in range(n)]
    random.Random(seed).shuffle(lengths)
    return lengths


def token_prompt(length: int, seed: int, vocab: tuple[int, int] = (1000, 40000)) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(*vocab) for _ in range(length)]


def gauges(metrics_text: str) -> dict[str, float]:
    """The server's running/waiting/KV-usage gauges, summed over their label sets."""
    out = {g: 0.0 for g in GAUGES}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


async def _stream(session, base: str, model: str, prompt: list[int], max_tokens: int, abort_after: int | None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    record = {"prompt_tokens": len(prompt), "aborted": abort_after is not None, "events": 0,
              "completion_tokens": None, "status": None, "error": None, "first_token_s": None}
    try:
        async with session.post(base + "/v1/completions", json=body) as r:
            record["status"] = r.status
            if r.status != 200:
                record["error"] = (await r.text())[:300]
                return record
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    record["completion_tokens"] = event["usage"]["completion_tokens"]
                if event.get("choices"):  # one event per engine step that produced tokens
                    record["events"] += 1
                    if record["first_token_s"] is None:
                        record["first_token_s"] = time.perf_counter() - t0
                if abort_after is not None and record["events"] >= abort_after:
                    break  # leaving the block closes the connection: the server aborts the request
    except Exception as e:  # noqa: BLE001 - the record carries it; the caller judges
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = time.perf_counter() - t0
    return record


async def _metrics(session, base: str) -> dict[str, float]:
    async with session.get(base + "/metrics") as r:
        return gauges(await r.text())


async def _run(base: str, model: str, lengths: list[int], max_tokens: int, abort_every: int, abort_after: int,
               settle_s: float, timeout_s: float) -> dict:
    import aiohttp

    base = base.rstrip("/")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        t0 = time.perf_counter()
        tasks = [_stream(session, base, model, token_prompt(n, seed=i), max_tokens,
                         abort_after if abort_every and (i + 1) % abort_every == 0 else None)
                 for i, n in enumerate(lengths)]
        try:
            streams = await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
            hung = False
        except asyncio.TimeoutError:
            streams, hung = [], True
        wall = time.perf_counter() - t0
        settle_start = time.perf_counter()
        seen = await _metrics(session, base)
        while any(v > 0 for v in seen.values()) and time.perf_counter() - settle_start < settle_s:
            await asyncio.sleep(0.25)
            seen = await _metrics(session, base)
        settled = None if any(v > 0 for v in seen.values()) else time.perf_counter() - settle_start
        after = await _stream(session, base, model, token_prompt(64, seed=10_000), 4, None)
    return {"streams": streams, "hung": hung, "wall_s": wall, "gauges_after": seen, "settled_s": settled,
            "request_after": after, "max_tokens": max_tokens}


def run_load(base: str, model: str, lengths: list[int], max_tokens: int = 32, abort_every: int = 5,
             abort_after: int = 2, settle_s: float = 10.0, timeout_s: float = 1800.0) -> dict:
    """Run the load (see the module docstring) and return what happened."""
    return asyncio.run(_run(base, model, lengths, max_tokens, abort_every, abort_after, settle_s, timeout_s))


def problems(result: dict) -> list[str]:
    """What went wrong in a ``run_load`` result (empty: nothing)."""
    out = []
    if result["hung"]:
        out.append("the streams did not all end before the timeout")
    for i, s in enumerate(result["streams"]):
        if s["error"] or s["status"] != 200:
            out.append(f"stream {i} ({s['prompt_tokens']} tokens): status {s['status']}, {s['error']}")
        elif not s["aborted"] and s["completion_tokens"] != result["max_tokens"]:
            out.append(f"stream {i} ({s['prompt_tokens']} tokens) got {s['completion_tokens']} tokens, "
                       f"not {result['max_tokens']}")
    if result["settled_s"] is None:
        out.append(f"gauges did not return to 0: {result['gauges_after']}")
    after = result["request_after"]
    if after["status"] != 200 or after["completion_tokens"] != 4:
        out.append(f"the request after the load failed: {after}")
    return out
