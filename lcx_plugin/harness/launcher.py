"""The one engine launcher: every engine job of lcx's harness (batch runs, ``lcx ab`` arms,
benchmarks) runs in a fresh child process, with engine arguments and environment built here.

vLLM engines are not meant to be torn down and rebuilt inside one process, and a child keeps one
run's state from leaking into the next. The child module is run as
``python -m MODULE JOB.json OUT.json`` would run it, forked from a process that has already imported
vLLM where it can be (``zygote.py``), and must write OUT.json on success; its own output (the
engine's log) goes to a file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import zygote
from .settings import RunSettings, choose

#: Engine defaults for lcx's own runs. Eager: eager and compiled outputs differ by bf16 noise,
#: so comparisons pin one mode.
ENGINE_DEFAULTS = {"enforce_eager": True, "max_model_len": 8192, "seed": 0}
KVCACHE_GIB_DEFAULT = "2"


def engine_args(model: str, backend: str | None = None, lcx: dict | None = None, overrides: dict | None = None,
                settings: RunSettings | None = None) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``: lcx's defaults, the machine's dtype,
    then ``overrides``."""
    settings = settings or choose()
    kwargs = {"model": model, **ENGINE_DEFAULTS, "dtype": settings.dtype, **(overrides or {})}
    if backend:
        kwargs["attention_backend"] = backend
    if lcx is not None:
        kwargs["additional_config"] = {"lcx": lcx}
    return kwargs


def child_env(settings: RunSettings | None = None, extra: dict | None = None) -> dict:
    env = {**os.environ, **(settings or choose()).env(), **(extra or {})}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", KVCACHE_GIB_DEFAULT)
    return env


def run_child(module: str, payload: dict, what: str, log_path: str | Path | None = None,
              settings: RunSettings | None = None, extra_env: dict | None = None,
              timeout: float | None = None) -> dict:
    """Run ``module`` on ``payload``; return its JSON result, or raise with the log's tail."""
    with tempfile.TemporaryDirectory(prefix="lcx-child-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.json")
        job_path.write_text(json.dumps(payload))
        log_file = Path(log_path) if log_path else Path(tmp, "engine.log")
        env = child_env(settings, extra_env)
        if zygote.enabled():
            returncode = zygote.run(module, [str(job_path), str(out_path)], env, str(log_file), timeout)
        else:
            with open(log_file, "w") as log:
                returncode = subprocess.run([sys.executable, "-m", module, str(job_path), str(out_path)], stdout=log,
                                            stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        if returncode != 0 or not out_path.exists():
            raise RuntimeError(f"{what} failed (exit {returncode}); engine log {log_file}:\n"
                               + log_file.read_text()[-4000:])
        return json.loads(out_path.read_text())


def kv_capacity(vllm_config) -> dict:
    """The engine's KV capacity in tokens as run, and at bfloat16 (the dtype fleets serve). vLLM
    sizes the cache as bytes / page bytes, linear in the element size, so a float32 engine's block
    count doubles at bf16 (checked against a real bf16 engine in tests/engine/test_settings_engine.py)."""
    import torch

    cc = vllm_config.cache_config
    # What the engine logs as "KV cache size: N tokens": max concurrency x max_model_len, which
    # accounts for every KV-cache group (blocks x block size does not, once groups differ).
    tokens = getattr(cc, "kv_cache_size_tokens", None)
    if not tokens:
        if not cc.num_gpu_blocks:
            return {"tokens": None, "tokens_bf16": None}
        tokens = cc.num_gpu_blocks * cc.block_size
    from lcx_plugin.config import resolve_config

    lcx = resolve_config(vllm_config.additional_config or {}, model=getattr(vllm_config.model_config, "model", None))
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if lcx.quantized and "lcx" in str(getattr(backend, "name", backend)).lower():
        # Quantized pages are sized in bytes, whatever the model's dtype: the same at bf16.
        return {"tokens": tokens, "tokens_bf16": tokens, "dtype": lcx.kv_format, "block_size": cc.block_size}
    dtype = vllm_config.model_config.dtype if cc.cache_dtype == "auto" else getattr(torch, cc.cache_dtype, None)
    size = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 2
    return {"tokens": tokens, "tokens_bf16": tokens * size // 2, "dtype": str(dtype).replace("torch.", ""),
            "block_size": cc.block_size}
