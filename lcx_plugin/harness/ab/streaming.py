"""One streaming interface over both kinds of arm.

``Streamer.stream(prompt, max_tokens)`` yields ``(text_delta, n_new_tokens)`` as tokens arrive,
greedy. ``EngineStreamer`` drives an in-process vLLM ``AsyncLLM``; ``EndpointStreamer`` speaks
the OpenAI completions API with server-sent events. Accuracy and load phases are written once
against this interface.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import AsyncIterator, Protocol


class Streamer(Protocol):
    async def stream(self, prompt: str, max_tokens: int, ignore_eos: bool = False) -> AsyncIterator[tuple[str, int]]: ...


class EngineStreamer:
    """An in-process vLLM engine (vLLM's AsyncLLM). Build inside the process that uses it."""

    _ids = itertools.count()

    def __init__(self, kwargs: dict):
        """``kwargs``: engine arguments, as ``launcher.engine_args`` makes them."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    async def stream(self, prompt: str, max_tokens: int, ignore_eos: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos,
                                output_kind=RequestOutputKind.DELTA)
        async for out in self.engine.generate(prompt, params, request_id=f"ab-{next(self._ids)}"):
            c = out.outputs[0]
            if c.token_ids:
                yield c.text, len(c.token_ids)

    def close(self) -> None:
        import gc

        self.engine.shutdown()
        # Collect the engine now, while the interpreter is whole: its finalizer calls shutdown()
        # again, which fails noisily if it only runs at interpreter exit.
        self.engine = None
        gc.collect()


_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)


def kv_capacity_from_metrics(text: str) -> int | None:
    """KV capacity in tokens from a vLLM ``/metrics`` page (num_gpu_blocks x block_size)."""
    m = _CACHE_INFO.search(text)
    if not m:
        return None
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


class EndpointStreamer:
    """Any OpenAI-compatible endpoint (a vLLM server, a fleet's Service, a gateway)."""

    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 600):
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = model
        self.timeout_s = timeout_s
        self._session = None

    async def _client(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        if self.model is None:
            async with self._session.get(self.base_url + "/v1/models") as r:
                if r.status != 200:
                    raise RuntimeError(f"{self.base_url}/v1/models answered {r.status}: is this an OpenAI-compatible server?")
                self.model = (await r.json())["data"][0]["id"]
        return self._session

    async def stream(self, prompt: str, max_tokens: int, ignore_eos: bool = False):
        session = await self._client()
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension of the completions API
        async with session.post(self.base_url + "/v1/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"{self.base_url} answered {r.status}: {(await r.text())[:500]}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        yield choice["text"], 1  # vLLM streams one token per event

    async def metrics_text(self) -> str | None:
        session = await self._client()
        async with session.get(self.base_url + "/metrics") as r:
            return await r.text() if r.status == 200 else None

    async def close_async(self) -> None:
        if self._session is not None:
            await self._session.close()
