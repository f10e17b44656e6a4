"""The reliability matrix's engine runs: one method under pressure against the same method at ease.

    python -m lcx_plugin.harness.reliability JOB.json OUT.json   (a child; see ``run_matrix_engine``)

Two engines per method, each in its own child process:

* **at ease** (``EASY``): whole prefill, a roomy cache, prefix caching on. Each prompt runs alone
  with prompt log-probabilities (the teacher-forced baseline); then the prompts batched again (full
  prefix-cache hits), then batched variants that share only their first blocks with them (partial hits).
* **tensor-parallel** (``TENSOR_PARALLEL``, when ``tensor_parallel`` > 1): the at-ease engine
  split over that many CPU worker processes, the prompts batched once with prompt log-probabilities.
* **pressured** (``PRESSURED``): prefill chunks of 384 tokens mixed with decode steps, a cache so
  small that the scheduler preempts and recomputes, prefix caching on, and the prompts batched
  ``copies`` times in one call (copies find each other's blocks in the cache); then the prompts
  once more, batched, with prompt log-probabilities (those read no cache).

Every phase records tokens, the top-2 log-probabilities of every generated step (so a flipped token
can be checked for a near-tie), prompt log-probabilities where asked, and the engine's own count of
prefix-cache hits per request. ``compare.py`` holds the checkers.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .launcher import engine_args, kv_capacity, run_child
from .settings import RunSettings, choose

#: vLLM's CPU engine's page (block) size; prefix-cache hits come in whole pages.
PAGE = 128
EASY = {"enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 8192,
        "max_model_len": 2048}
# 10 pages of 128 tokens (9 usable): the four prompts (1 + 3 + 5 + 7 pages once decoding) cannot
# all be resident, so the scheduler preempts; every prompt alone still fits. Chunks of 384 tokens.
PRESSURED = {"enable_prefix_caching": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 384,
             "max_num_seqs": 16, "max_model_len": 1024, "num_gpu_blocks_override": 10}
#: The tensor-parallel engine: at ease, split over worker processes. The embedded model's 9 query
#: and 3 KV heads split over 3 ranks (one KV head each), not over 2. Its cache holds 64 pages (8,192
#: tokens), more than the four prompts batched (16 pages once decoding) need: the ranks create only
#: those. Creating the whole budget (below) took 14.6 s of the engine's start on 2 cores, 64 pages
#: 0.14 s, with the same tokens and log-probabilities.
TENSOR_PARALLEL = {**EASY, "distributed_executor_backend": "mp", "num_gpu_blocks_override": 64}
#: Each tensor-parallel rank's KV-cache budget, GiB (``VLLM_CPU_KVCACHE_SPACE``; whole GiB only):
#: 1 GiB holds about 70k tokens of its one KV head. (With 2 GiB, before the page count above, the
#: cache took 34 s to create.)
TENSOR_PARALLEL_KV_GIB = "1"
#: Seconds the tensor-parallel engine's executor waits for its workers to leave at shutdown before
#: it terminates them (vLLM's default 5). The result is written by then, and on 2 cores the
#: workers never left within the 5 s: 5 s lost per engine.
TENSOR_PARALLEL_SHUTDOWN_S = "0"


@dataclass
class MatrixJob:
    model: str
    prompts: list[list[int]]  # token ids: the partial-hit variants are cut on page boundaries
    backend: str | None = None
    lcx: dict | None = None
    pressured: bool = False
    copies: int = 10
    max_tokens: int = 16
    shared_pages: int = 2  # partial-hit variants keep this many of the prompt's first pages
    engine: dict = field(default_factory=dict)  # on top of EASY / PRESSURED / TENSOR_PARALLEL
    tensor_parallel: int = 1  # > 1: the tensor-parallel engine (``pressured`` must be off)


def _steps(entries) -> list[dict[int, float]]:
    """Per generated step, ``{token_id: logprob}`` for the returned candidates (top-2 plus the chosen)."""
    return [{int(t): float(lp.logprob) for t, lp in e.items()} for e in entries]


def _outputs(outs, with_prompt: bool) -> dict:
    res = {"request_ids": [o.request_id for o in outs], "token_ids": [list(o.outputs[0].token_ids) for o in outs],
           "top": [_steps(o.outputs[0].logprobs) for o in outs],
           "cached": [int(o.num_cached_tokens or 0) for o in outs]}
    if with_prompt:
        res["prompt_logprobs"] = [[None if e is None else next(iter(e.values())).logprob for e in o.prompt_logprobs]
                                  for o in outs]
    return res


def _partial(prompts: list[list[int]], pages: int) -> list[list[int]]:
    """Prompt i's first ``pages`` pages (or all of its whole pages, if fewer), then the last 150
    tokens of the next prompt: a prefix-cache hit of exactly those pages when prompt i is cached."""
    return [p[:shared_tokens(p, pages)] + prompts[(i + 1) % len(prompts)][-150:] for i, p in enumerate(prompts)]


def shared_tokens(prompt: list[int], pages: int) -> int:
    """How many tokens of ``prompt`` a partial-hit variant shares with it (whole pages)."""
    return min(pages, len(prompt) // PAGE) * PAGE


def _child(job: dict, settings: dict, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    from .batch import _lcx_counters, watch_preemptions

    run = RunSettings(**settings)
    tp = job.get("tensor_parallel", 1)
    base = PRESSURED if job["pressured"] else {**TENSOR_PARALLEL, "tensor_parallel_size": tp} if tp > 1 else EASY
    engine = {**base, **job["engine"]}
    llm = LLM(**engine_args(job["model"], job["backend"], job["lcx"], engine, run))
    preempted = watch_preemptions(llm)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]

    def params(with_prompt: bool) -> Any:
        return SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=2,
                              prompt_logprobs=0 if with_prompt else None)

    def alone(ps, with_prompt):
        return _outputs([llm.generate([p], params(with_prompt), use_tqdm=False)[0] for p in ps], with_prompt)

    def batched(ps):
        return _outputs(llm.generate(ps, params(False), use_tqdm=False), False)

    result: dict = {"engine": engine, "kv_capacity": kv_capacity(llm.llm_engine.vllm_config)}
    if tp > 1:
        result["tf_batched"] = _outputs(llm.generate(prompts, params(True), use_tqdm=False), True)
    elif job["pressured"]:
        # Interleaved (p0, p1, p2, p3, p0, ...): requests of different prompts prefill and decode
        # side by side, so their pages compete and the scheduler must preempt.
        batch = [p for _ in range(job["copies"]) for p in prompts]
        result["batched"] = _outputs(llm.generate(batch, params(False), use_tqdm=False), False)
        result["preempted_in_batch"] = len(preempted)
        result["tf_batched"] = _outputs(llm.generate(prompts, params(True), use_tqdm=False), True)
    else:
        result["tf_alone"] = alone(prompts, True)
        # Batched, not alone: each request's hits are its own pages (the variants share no whole
        # page with each other), and a batch of four decodes in a quarter of the steps.
        result["cached"] = batched(prompts)
        variants = _partial(job["prompts"], job["shared_pages"])
        result["partial"] = batched([{"prompt_token_ids": v} for v in variants])
        result["partial_prompts"] = variants
        result["shared_pages"] = job["shared_pages"]
    result["preemptions"] = len(preempted)
    result["preempted"] = preempted
    result["lcx_counters"] = _lcx_counters()
    Path(out_path).write_text(json.dumps(result))
    if tp > 1:
        _stop_workers()


def _stop_workers() -> None:
    """Kill the tensor-parallel engine's worker processes once the result is written. At exit
    vLLM's executor asks them to leave, then sends SIGTERM and waits 4 s before SIGKILL; on 2
    cores the three ranks never left in time, so every tensor-parallel engine lost those 4 s."""
    import multiprocessing

    # vLLM's executor then logs the workers' deaths as an error ("died unexpectedly"): expected.
    print("lcx reliability: result written; killing the tensor-parallel workers", file=sys.stderr, flush=True)
    for proc in multiprocessing.active_children():
        proc.kill()
    for proc in multiprocessing.active_children():
        proc.join(timeout=10)


def run_matrix_engine(job: MatrixJob, log_path: str | None = None, settings: RunSettings | None = None,
                      timeout: float = 1800) -> dict:
    """One engine of the matrix in a child process (engine core in that process, as ``run_arm``)."""
    if job.tensor_parallel > 1 and job.pressured:
        raise ValueError("the tensor-parallel engine runs at ease only")
    settings = (settings or choose()).for_ranks(job.tensor_parallel)
    payload = {"job": asdict(job), "settings": asdict(settings)}
    mode = "pressured" if job.pressured else f"tensor_parallel_size={job.tensor_parallel}" if job.tensor_parallel > 1 \
        else "at ease"
    what = f"reliability engine {job.lcx or 'stock'} ({mode})"
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if job.tensor_parallel > 1:
        env.update(VLLM_CPU_KVCACHE_SPACE=TENSOR_PARALLEL_KV_GIB, VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS=TENSOR_PARALLEL_SHUTDOWN_S)
    return run_child("lcx_plugin.harness.reliability", payload, what, log_path=log_path, settings=settings,
                     extra_env=env, timeout=timeout)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    _child(data["job"], data["settings"], sys.argv[2])
