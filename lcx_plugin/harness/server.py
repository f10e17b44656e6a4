"""Start and stop a real ``vllm serve`` process on 127.0.0.1 (tests and benchmarks)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (each socket is held until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def vllm_executable() -> str:
    exe = Path(sys.executable).with_name("vllm")
    if not exe.exists():
        raise FileNotFoundError(f"no vllm CLI next to {sys.executable}; run the tests in the project env (./lcx test)")
    return str(exe)


def http_json(url: str, payload: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return r.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def serve_args(model: str, port: int, lcx: dict | None, max_model_len: int = 2048,
               served_name: str = "smollm2", dtype: str | None = None) -> list[str]:
    """``vllm serve`` on 127.0.0.1:``port``, with lcx (``lcx`` its config) or stock (``None``)."""
    args = [vllm_executable(), "serve", model, "--enforce-eager", "--max-model-len", str(max_model_len),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name]
    if dtype is not None:
        args += ["--dtype", dtype]
    if lcx is not None:
        args += ["--attention-backend", "lcx", "--additional-config", json.dumps({"lcx": lcx})]
    return args


@contextmanager
def served(args: list[str], log_path: Path, startup_timeout: float = 300, env: dict | None = None):
    """Run the server command ``args`` (which carries ``--port``) and yield its base URL once /health
    answers; stop it, and its whole process group, on exit."""
    with served_together([(args, log_path)], startup_timeout, env) as (base,):
        yield base


@contextmanager
def served_together(servers: list[tuple], startup_timeout: float = 300, env: dict | None = None):
    """Start every ``(args, log_path)`` or ``(args, log_path, extra_env)`` server at once (their
    start-ups overlap) and yield their base URLs, in order, once each answers /health; stop them all
    on exit."""
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    binds = spread_binds(len(servers)) if len(servers) > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env else None
    running: list[tuple[subprocess.Popen, object]] = []
    try:
        for i, (args, log_path, *extra) in enumerate(servers):
            log = open(log_path, "w")
            own = {**({"VLLM_CPU_OMP_THREADS_BIND": binds[i]} if binds else {}), **(extra[0] if extra else {})}
            running.append((subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**env, **own}, start_new_session=True), log))
        deadline = time.monotonic() + startup_timeout
        bases = []
        for (args, log_path, *_), (proc, _) in zip(servers, running):
            base = f"http://127.0.0.1:{int(args[args.index('--port') + 1])}"
            _wait_healthy(proc, base, args, Path(log_path), deadline, startup_timeout)
            bases.append(base)
        yield tuple(bases)
    finally:
        for proc, log in running:
            _stop(proc)
            log.close()


def spread_binds(n: int, cpus: list[int] | None = None) -> list[str]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``n`` CPU servers on one machine: disjoint slices of the
    usable CPUs, round-robin where there are more servers than CPUs. vLLM's own "auto" binds every
    server's worker to the same CPUs (all but one, which it keeps for the front end: CPU 0 alone on
    2 cores), so servers started together shared one core: 4 started together took 106 s to answer
    /health, against 74 s spread over both (2-core AVX-512 EPYC)."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    per = max(1, len(cpus) // n)
    slices = [cpus[i * per:(i + 1) * per] for i in range(max(1, len(cpus) // per))]
    return [",".join(map(str, slices[i % len(slices)])) for i in range(n)]


def _wait_healthy(proc: subprocess.Popen, base: str, args: list[str], log_path: Path, deadline: float,
                  startup_timeout: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}\ncommand: {args}\n{log_path.read_text()[-4000:]}")
        try:
            if http_json(base + "/health", timeout=5)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server not healthy after {startup_timeout} s\ncommand: {args}\n{log_path.read_text()[-4000:]}")
        time.sleep(2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
