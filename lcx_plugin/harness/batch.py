"""Run prompts through one real vLLM engine in a child process: tokens, log-probabilities, timings.

    python -m lcx_plugin.harness.batch SPEC.json OUT.json

SPEC: {"model": dir, "backend": null|"lcx", "lcx": {...}|null, "prompts": [str | [ids]],
       "max_tokens": int, "engine": {LLM kwargs}, "settings": {"bind", "dtype"},
       "prompt_logprobs": bool, "logprobs": bool, "timing": bool, "repeats": int}

With ``prompt_logprobs`` the result holds, per prompt, the log-probability the engine gives each
prompt token after the tokens before it (teacher-forced; the first token has none). With
``logprobs`` it holds the log-probability of each generated token as it was generated.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .launcher import engine_args, kv_capacity, run_child
from .settings import RunSettings, choose


@dataclass
class ArmSpec:
    model: str
    backend: str | None = None  # None: the platform's default (stock)
    lcx: dict | None = None
    prompts: list[Any] = field(default_factory=list)
    max_tokens: int = 32
    engine: dict = field(default_factory=dict)
    prompt_logprobs: bool = False
    logprobs: bool = False
    alone: bool = False  # also run each prompt on its own (after the batch), in the same engine
    timing: bool = False  # also measure TTFT (1-token run) and decode tokens/s per prompt
    repeats: int = 3  # timing: median of this many runs per prompt
    batch_timing: bool = False  # also measure decode tokens/s with every prompt running together (prefix cache on)


def _token_logprobs(entries) -> list[float | None]:
    """One float per position from vLLM's ``[None | {token_id: Logprob}]`` lists (the scored token)."""
    return [None if e is None else next(iter(e.values())).logprob for e in entries]


def _add_logprobs(result: dict, outs, spec: dict) -> None:
    if spec.get("prompt_logprobs"):
        result["prompt_logprobs"] = [_token_logprobs(o.prompt_logprobs) for o in outs]
    if spec.get("logprobs"):
        result["logprobs"] = [_token_logprobs(o.outputs[0].logprobs) for o in outs]


def watch_preemptions(llm) -> list[list]:
    """A list that collects ``[request id, tokens it had generated]`` for every request the
    scheduler preempts (the engine core runs in this process: see ``run_arm``). vLLM logs no line
    for a preemption, so tests read this. A preempted request is recomputed from the start, its
    generated tokens as prompt."""
    seen: list[list] = []
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    original = scheduler._preempt_request

    def preempt(request, *args, **kwargs):
        # The id the caller sees: the engine appends "-" and a random suffix to it internally.
        seen.append([request.request_id.rsplit("-", 1)[0], request.num_output_tokens])
        return original(request, *args, **kwargs)

    scheduler._preempt_request = preempt
    return seen


def _lcx_counters() -> dict:
    """The event counts lcx's selectors kept in this process (the engine core runs here)."""
    try:
        from lcx_plugin.attention_backends.vllm.backend import REQUESTS
    except ImportError:
        return {}
    return dict(REQUESTS.counters)


def _batch_timing(llm, prompts: list, max_tokens: int, repeats: int) -> dict:
    """Every prompt at once, decode tokens/s: ``len(prompts) * (max_tokens - 1) / (t_full - t_first)``,
    where both runs find the prompts in the prefix cache (a first run puts them there), so their
    difference is the decode alone rather than the small difference of two long prefills. Medians
    of ``repeats`` runs. ``prefill_cold_s`` is that first run (after ``_child``'s own batch it may
    already find the prompts cached). Needs prefix caching on; the method must keep its state correct over
    cached pages."""
    from vllm import SamplingParams

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    cold = time.perf_counter() - t0
    first, whole = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate(prompts, full, use_tqdm=False)
        first.append(t1 - t0)
        whole.append(time.perf_counter() - t1)
    t_first, t_full = statistics.median(first), statistics.median(whole)
    return {"batch": len(prompts), "prefill_cold_s": cold, "first_token_cached_s": t_first, "full_cached_s": t_full,
            "decode_tps": len(prompts) * (max_tokens - 1) / max(t_full - t_first, 1e-9)}


def _child(spec: dict, settings: dict, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    run = RunSettings(**settings)
    t0 = time.perf_counter()
    llm = LLM(**engine_args(spec["model"], spec.get("backend"), spec.get("lcx"), spec.get("engine"), run))
    startup_s = time.perf_counter() - t0
    preemptions = watch_preemptions(llm)
    prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in spec["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            prompt_logprobs=0 if spec.get("prompt_logprobs") else None,
                            logprobs=1 if spec.get("logprobs") else None)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    batch_s = time.perf_counter() - t0
    result = {
        "backend": spec.get("backend") or "stock",
        "startup_s": startup_s,
        "batch_s": batch_s,
        "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "kv_capacity": kv_capacity(llm.llm_engine.vllm_config),
        "preemptions": preemptions,
    }
    _add_logprobs(result, outs, spec)
    result["lcx_counters"] = _lcx_counters()
    if spec.get("alone"):
        alone = [llm.generate([p], greedy, use_tqdm=False)[0] for p in prompts]
        result["alone"] = {"token_ids": [list(o.outputs[0].token_ids) for o in alone]}
        _add_logprobs(result["alone"], alone, spec)
    if spec.get("timing"):
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        plain = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
        ttft, tps = [], []
        for p in prompts:  # one request at a time: latency, not throughput
            first, full = [], []
            for _ in range(spec.get("repeats", 3)):
                t0 = time.perf_counter()
                llm.generate([p], one, use_tqdm=False)
                t1 = time.perf_counter()
                llm.generate([p], plain, use_tqdm=False)
                t2 = time.perf_counter()
                first.append(t1 - t0)
                full.append(t2 - t1)
            t_first, t_full = statistics.median(first), statistics.median(full)
            ttft.append(t_first)
            tps.append((spec["max_tokens"] - 1) / max(t_full - t_first, 1e-9))
        result["ttft_s"] = ttft
        result["decode_tps"] = tps
    if spec.get("batch_timing"):
        result["batch_timing"] = _batch_timing(llm, prompts, spec["max_tokens"], spec.get("repeats", 3))
    Path(out_path).write_text(json.dumps(result))


def run_arm(spec: ArmSpec, log_path: str | None = None, timeout: float = 1800, settings: RunSettings | None = None) -> dict:
    """Run one arm in a child process; returns its result dict. Raises with the log tail on failure."""
    settings = settings or choose()
    payload = {"spec": asdict(spec), "settings": asdict(settings)}
    # The engine core in this process: every prompt is queued before the first step, so each run
    # schedules the same batches. (With the core in its own process, requests reach it while it
    # already steps, the first batches vary from run to run, and so do the bf16 results.)
    return run_child("lcx_plugin.harness.batch", payload, f"vLLM arm {spec.backend or 'stock'}", log_path=log_path,
                     settings=settings, extra_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, timeout=timeout)


if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    _child(job["spec"], job["settings"], sys.argv[2])
