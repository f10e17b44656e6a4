"""Run a vLLM engine job in a fresh child process: JSON in, JSON out, the engine's log to a file.

vLLM engines are not meant to be torn down and rebuilt inside one process, and a child keeps
one run's state from leaking into the next. The child module is run as
``python -m MODULE JOB.json OUT.json`` and must write OUT.json on success.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_child(module: str, payload: dict, what: str, log_path: str | Path | None = None,
              extra_env: dict | None = None, pass_fds: tuple[int, ...] = (), timeout: float | None = None) -> dict:
    """Run ``module`` on ``payload``; return its JSON result, or raise with the log's tail."""
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with tempfile.TemporaryDirectory(prefix="lcx-child-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.json")
        job_path.write_text(json.dumps(payload))
        log_file = Path(log_path) if log_path else Path(tmp, "engine.log")
        with open(log_file, "w") as log:
            proc = subprocess.run([sys.executable, "-m", module, str(job_path), str(out_path)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds, timeout=timeout)
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"{what} failed (exit {proc.returncode}); engine log {log_file}:\n"
                               + log_file.read_text()[-4000:])
        return json.loads(out_path.read_text())
