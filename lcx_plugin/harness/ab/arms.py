"""Arms of an A/B run: an in-process vLLM engine (stock or lcx) or any OpenAI-compatible URL.

Spec strings, as typed after ``--arm-a`` / ``--arm-b``:
- ``stock``: vLLM with its default attention backend;
- ``lcx``: vLLM with ``--attention-backend lcx`` and no config, which serves lcx's recommended default
  (``lcx_plugin/recommended.py``);
- ``lcx:{"method": "dense"}`` or ``lcx:path/to/config.json``: the same with that config;
- ``http://host:port`` (optionally ``/v1``): an endpoint, e.g. a stock fleet's and an lcx fleet's Service.

Engine arms run one after the other, each in a fresh child process that builds its engine,
runs both phases and exits, so the two arms never share memory or state.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

from lcx_plugin.config import LcxConfig

from ..launcher import engine_args, kv_capacity
from ..settings import RunSettings
from .tasks import Sample


class ArmSpecError(ValueError):
    pass


@dataclass
class Arm:
    label: str
    kind: str  # "engine" | "endpoint"
    backend: str | None = None
    lcx: dict | None = None
    url: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Arm":
        spec = spec.strip()
        if spec.startswith(("http://", "https://")):
            return cls(label=spec.split("//", 1)[1].rstrip("/"), kind="endpoint", url=spec)
        if spec == "stock":
            return cls(label="stock", kind="engine")
        if spec == "lcx":  # no config: the engine serves lcx's recommended default
            return cls(label="lcx default", kind="engine", backend="lcx", lcx=None)
        if spec.startswith("lcx:"):
            raw = spec[4:].strip()
            if raw and not raw.startswith("{"):
                path = Path(raw)
                if not path.is_file():
                    raise ArmSpecError(f"arm {spec!r}: {raw!r} is neither inline JSON nor an existing file")
                raw = path.read_text()
            try:
                cfg = json.loads(raw or "{}")
            except json.JSONDecodeError as e:
                raise ArmSpecError(f"arm {spec!r}: bad JSON config: {e}") from None
            LcxConfig.from_dict(cfg, f"arm {spec!r}")  # one clear error now, not after an engine start
            label = "lcx" + ("" if not cfg else " " + " ".join(f"{k}={v}" for k, v in sorted(cfg.items())))
            return cls(label=label, kind="engine", backend="lcx", lcx=cfg)
        raise ArmSpecError(f"arm {spec!r}: expected 'stock', 'lcx[:CONFIG]' or an http(s):// URL")


@dataclass
class Job:
    samples: list[Sample]
    load_prompts: list[str]
    load_max_tokens: int
    load_concurrency: int
    accuracy_concurrency: int = 2
    model: str | None = None
    engine: dict = field(default_factory=dict)  # engine overrides on top of the launcher's defaults
    settings: dict = field(default_factory=dict)  # RunSettings of this run, the same for both arms
    speed_ttft_prompt: str | None = None  # speed phase (evaluate.speed_phase); None: none
    speed_batch_prompts: list[str] = field(default_factory=list)
    speed_max_tokens: int = 64


def _progress_stream() -> tuple[TextIO, bool | None]:
    """Where progress goes, and whether to draw it as a bar: in an engine child, a file the parent
    relays to its stderr (``relayed``), drawn as a bar where that stderr is a terminal (the child's
    own stdout/stderr carry the engine's log into a file)."""
    path = os.environ.get(PROGRESS_PATH_ENV)
    if path:
        return open(path, "a", buffering=1), os.environ.get(PROGRESS_TTY_ENV) == "1"
    return sys.stderr, None


PROGRESS_PATH_ENV = "LCX_AB_PROGRESS_PATH"
PROGRESS_TTY_ENV = "LCX_AB_PROGRESS_TTY"


@contextmanager
def relayed(stream: TextIO, poll_s: float = 0.2) -> Iterator[str]:
    """A file path whose content is copied to ``stream`` as it grows, and entirely by the end of the
    ``with``. An engine child writes its progress there: an inherited descriptor would do, but a
    child given one cannot fork from the launcher's forkserver (about 7 s more per arm)."""
    with tempfile.TemporaryDirectory(prefix="lcx-progress-") as tmp:
        path = Path(tmp, "progress")
        path.touch()
        done = threading.Event()

        def pump(f) -> None:
            while True:
                last = done.is_set()  # read once more after the child is done: nothing is left behind
                chunk = f.read()
                if chunk:
                    stream.write(chunk)
                    stream.flush()
                elif last:
                    return
                else:
                    time.sleep(poll_s)

        with open(path, errors="replace") as f:
            thread = threading.Thread(target=pump, args=(f,), daemon=True, name="lcx-progress-relay")
            thread.start()
            try:
                yield str(path)
            finally:
                done.set()
                thread.join()


async def _evaluate(streamer, job: Job, label: str) -> dict:
    from ..progress import Progress
    from .evaluate import accuracy_phase, load_phase, speed_phase

    stream, terminal = _progress_stream()
    with Progress(len(job.samples), f"[{label}] accuracy", stream, terminal) as p:
        rows = await accuracy_phase(streamer, job.samples, job.accuracy_concurrency, on_done=p.advance)
    with Progress(len(job.load_prompts), f"[{label}] load x{job.load_concurrency}", stream, terminal) as p:
        load = await load_phase(streamer, job.load_prompts, job.load_max_tokens, job.load_concurrency,
                                on_done=p.advance)
    speed = None
    if job.speed_ttft_prompt:
        with Progress(2, f"[{label}] speed: TTFT, then decode x{len(job.speed_batch_prompts)}", stream, terminal) as p:
            speed = await speed_phase(streamer, job.speed_ttft_prompt, job.speed_batch_prompts, job.speed_max_tokens,
                                      on_done=p.advance)
    return {"samples": rows, "load": load, "speed": speed}


def _engine_child(job_path: str, out_path: str) -> None:
    from .streaming import EngineStreamer

    spec = json.loads(Path(job_path).read_text())
    arm, job = Arm(**spec["arm"]), spec["job"]
    job = Job(samples=[Sample(**{**s, "answers": tuple(s["answers"]), "context_span": tuple(s["context_span"])})
                       for s in job.pop("samples")], **job)
    settings = RunSettings(**job.settings)
    streamer = EngineStreamer(engine_args(job.model, arm.backend, arm.lcx, job.engine, settings))
    try:
        result = asyncio.run(_evaluate(streamer, job, arm.label))
        result["kv_capacity"] = kv_capacity(streamer.engine.vllm_config)
        result["kv_capacity_tokens"] = result["kv_capacity"]["tokens_bf16"]
    finally:
        streamer.close()
    Path(out_path).write_text(json.dumps(result))


def run_engine_arm(arm: Arm, job: Job, log_path: Path) -> dict:
    from lcx_plugin.harness.launcher import run_child

    # The engine's own chatter goes to the log; progress to our stderr, through a relayed file.
    with relayed(sys.stderr) as progress:
        return run_child("lcx_plugin.harness.ab.arms", {"arm": asdict(arm), "job": asdict(job)}, f"arm {arm.label}",
                         log_path=log_path, settings=RunSettings(**job.settings),
                         extra_env={PROGRESS_PATH_ENV: progress, PROGRESS_TTY_ENV: str(int(sys.stderr.isatty()))})


def run_endpoint_arm(arm: Arm, job: Job) -> dict:
    from .streaming import EndpointStreamer, kv_capacity_from_metrics

    async def go():
        streamer = EndpointStreamer(arm.url)
        try:
            result = await _evaluate(streamer, job, arm.label)
            metrics = await streamer.metrics_text()
            result["kv_capacity_tokens"] = kv_capacity_from_metrics(metrics) if metrics else None
            result["served_model"] = streamer.model
            return result
        finally:
            await streamer.close_async()

    return asyncio.run(go())


def run_arm(arm: Arm, job: Job, log_path: Path) -> dict:
    """Run one arm; an engine arm's own log goes to ``log_path``."""
    result = run_engine_arm(arm, job, log_path) if arm.kind == "engine" else run_endpoint_arm(arm, job)
    return {"arm": asdict(arm), **result}


if __name__ == "__main__":
    _engine_child(sys.argv[1], sys.argv[2])
