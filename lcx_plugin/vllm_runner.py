"""Run prompts through one real vLLM engine in a child process and collect tokens and timings.

Each arm (stock or lcx) gets a fresh process: vLLM engines are not meant to be torn down and
rebuilt inside one process, and a child also keeps one arm's state from leaking into the other.

    python -m lcx_plugin.vllm_runner SPEC.json OUT.json

SPEC: {"model": dir, "backend": "CPU_ATTN"|"lcx"|..., "lcx": {...} | null, "prompts": [str | [ids]],
       "max_tokens": int, "engine": {extra LLM kwargs}, "timing": bool}
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ENGINE = {
    "enforce_eager": True,  # eager and compiled differ by bf16 noise: golden comparisons pin one mode
    "max_model_len": 8192,
    "dtype": "bfloat16",
    "seed": 0,
}


@dataclass
class ArmSpec:
    model: str
    backend: str | None = None  # None: the platform's default (stock)
    lcx: dict | None = None
    prompts: list[Any] = field(default_factory=list)
    max_tokens: int = 32
    engine: dict = field(default_factory=dict)
    timing: bool = False  # also measure TTFT (1-token run) and decode tokens/s per prompt
    repeats: int = 3  # timing: median of this many runs per prompt


def _child(spec: dict, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    kwargs = dict(DEFAULT_ENGINE, **spec.get("engine", {}))
    if spec.get("backend"):
        kwargs["attention_backend"] = spec["backend"]
    if spec.get("lcx") is not None:
        kwargs["additional_config"] = {"lcx": spec["lcx"]}
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **kwargs)
    startup_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in spec["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    batch_s = time.perf_counter() - t0
    result = {
        "backend": spec.get("backend") or "stock",
        "startup_s": startup_s,
        "batch_s": batch_s,
        "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
    }
    if spec.get("timing"):
        one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        ttft, tps = [], []
        for p in prompts:  # one request at a time: latency, not throughput
            first, full = [], []
            for _ in range(spec.get("repeats", 3)):
                t0 = time.perf_counter()
                llm.generate([p], one, use_tqdm=False)
                t1 = time.perf_counter()
                llm.generate([p], greedy, use_tqdm=False)
                t2 = time.perf_counter()
                first.append(t1 - t0)
                full.append(t2 - t1)
            t_first, t_full = statistics.median(first), statistics.median(full)
            ttft.append(t_first)
            tps.append((spec["max_tokens"] - 1) / max(t_full - t_first, 1e-9))
        result["ttft_s"] = ttft
        result["decode_tps"] = tps
    Path(out_path).write_text(json.dumps(result))


def run_arm(spec: ArmSpec, log_path: str | None = None, timeout: float = 1800) -> dict:
    """Run one arm in a child process; returns its result dict. Raises with the log tail on failure."""
    from lcx_plugin.child import run_child

    return run_child("lcx_plugin.vllm_runner", spec.__dict__, f"vLLM arm {spec.backend or 'stock'}",
                     log_path=log_path, timeout=timeout)


if __name__ == "__main__":
    _child(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
