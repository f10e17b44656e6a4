"""The two phases every arm goes through, written once against ``Streamer``.

- accuracy: each generated long-context sample, greedy, scored against its answers;
- load: N concurrent streaming requests, timing TTFT, TPOT and output tokens/s;
- speed (optional): at one long context, the time to first token of a cold prompt and the decode
  tokens/s of a batch of requests over that context.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

from .streaming import Streamer
from .tasks import Sample, score


@dataclass
class RequestTiming:
    ttft_s: float
    tpot_s: float | None  # mean time per output token after the first; None with < 2 tokens
    latency_s: float
    tokens: int


async def timed_request(streamer: Streamer, prompt: str, max_tokens: int, ignore_eos: bool = False,
                        stamps: list | None = None) -> tuple[str, RequestTiming]:
    """One streamed request; ``stamps`` (if given) collects ``(time, tokens)`` per arrival."""
    t0 = time.perf_counter()
    first = last = None
    tokens, parts = 0, []
    async for text, n in streamer.stream(prompt, max_tokens, ignore_eos=ignore_eos):
        now = time.perf_counter()
        first = now if first is None else first
        last = now
        tokens += n
        parts.append(text)
        if stamps is not None:
            stamps.append((now, n))
    if first is None:
        raise RuntimeError("the arm returned no tokens")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return "".join(parts), RequestTiming(first - t0, tpot, last - t0, tokens)


async def _bounded(coros, concurrency: int, on_done=None):
    sem = asyncio.Semaphore(concurrency)

    async def run(i, coro):
        async with sem:
            result = await coro
        if on_done:
            on_done()
        return i, result

    results = await asyncio.gather(*(run(i, c) for i, c in enumerate(coros)))
    return [r for _, r in sorted(results, key=lambda x: x[0])]


async def _in_groups(streamer: Streamer, samples: list[Sample], concurrency: int, on_done=None) -> list:
    """Every sample, at most ``concurrency`` in flight; the samples of one ``group`` (a
    conversation's turns) one after another, in list order, so each turn finds the previous
    turn's prompt in the prefix cache."""
    sem = asyncio.Semaphore(concurrency)
    outs: list = [None] * len(samples)
    groups: dict = {}
    for i, s in enumerate(samples):
        groups.setdefault(("group", s.group) if s.group is not None else ("one", i), []).append(i)

    async def run(indices):
        for i in indices:
            async with sem:
                outs[i] = await timed_request(streamer, samples[i].prompt, samples[i].max_tokens)
            if on_done:
                on_done()

    await asyncio.gather(*(run(ix) for ix in groups.values()))
    return outs


async def accuracy_phase(streamer: Streamer, samples: list[Sample], concurrency: int = 2, on_done=None) -> list[dict]:
    outs = await _in_groups(streamer, samples, concurrency, on_done)
    rows = []
    for s, (text, timing) in zip(samples, outs):
        sc = score(s, text)
        rows.append({
            "task": s.task, "target_tokens": s.target_tokens, "depth": s.depth, "seed": s.seed,
            "prompt_tokens": s.prompt_tokens, "answers": list(s.answers), "output": text,
            "exact": sc.exact, "score": sc.partial, "found": list(sc.found), "ttft_s": timing.ttft_s,
            "turn": s.turn,
        })
    return rows


async def load_phase(streamer: Streamer, prompts: list[str], max_tokens: int, concurrency: int, on_done=None) -> dict:
    t0 = time.perf_counter()
    outs = await _bounded([timed_request(streamer, p, max_tokens) for p in prompts], concurrency, on_done)
    wall = time.perf_counter() - t0
    timings = [asdict(t) for _, t in outs]
    total = sum(t["tokens"] for t in timings)
    return {"concurrency": concurrency, "requests": timings, "wall_s": wall, "output_tokens": total,
            "tokens_per_s": total / wall}


async def speed_phase(streamer: Streamer, ttft_prompt: str, batch_prompts: list[str], max_tokens: int,
                      on_done=None) -> dict:
    """Time to first token of ``ttft_prompt``, alone and cold (nothing of it cached), then decode
    tokens/s with every prompt of ``batch_prompts`` in flight at once, ``max_tokens`` each
    (end of text ignored). The batch holds the TTFT prompt again (an arm whose prefix cache holds
    it need not prefill it twice) and other documents of the same length.

    The decode rate counts the tokens that arrive while the whole batch is decoding: from the
    moment the last request has its first token to the moment the first request finishes.
    """
    _, alone = await timed_request(streamer, ttft_prompt, 1)
    if on_done:
        on_done()
    stamps: list[list] = [[] for _ in batch_prompts]
    outs = await asyncio.gather(*(timed_request(streamer, p, max_tokens, ignore_eos=True, stamps=s)
                                  for p, s in zip(batch_prompts, stamps)))
    if on_done:
        on_done()
    start = max(s[0][0] for s in stamps)
    end = min(s[-1][0] for s in stamps)
    tokens = sum(n for s in stamps for t, n in s if start < t <= end)
    if end <= start or tokens < len(batch_prompts):
        raise RuntimeError(f"speed phase: the batch of {len(batch_prompts)} never decoded together "
                           f"({tokens} tokens between {start:.3f} and {end:.3f} s); raise max_tokens")
    return {"ttft_s": alone.ttft_s, "batch": len(batch_prompts), "max_tokens": max_tokens,
            "decode_tokens_per_s": tokens / (end - start), "decode_window_s": end - start, "decode_tokens": tokens,
            "batch_ttft_s": [t.ttft_s for _, t in outs], "output_tokens": [t.tokens for _, t in outs]}
