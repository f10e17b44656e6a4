"""Engine settings that suit this machine, for lcx's own runs (demo, tests, benchmarks, ``lcx ab``).

Two settings decide how fast vLLM's CPU build runs here, and both arms of every comparison get
the same ones:

- **thread binding** (``VLLM_CPU_OMP_THREADS_BIND``): vLLM's default, ``auto``, keeps one core per
  worker free for the scheduler, which on a 2-core machine pins the model to one core. lcx binds
  the worker to every core this process may use (``0-{n-1}``), measured faster
  (``bench/cpu_settings.py``, ``bench/results/cpu_settings.json``).
- **dtype**: bfloat16 where the CPU has AVX512-BF16 or AMX; float32 where bf16 is emulated
  (about 3.5x slower there).

``LCX_CPU_BIND`` / ``LCX_DTYPE`` (or the commands' ``--bind`` / ``--dtype``) override either.
KV-capacity figures are always reported at bfloat16, the dtype fleets serve.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from lcx_plugin.machine import CpuInfo, cpu_info

BIND_ENV, DTYPE_ENV = "LCX_CPU_BIND", "LCX_DTYPE"
DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class RunSettings:
    bind: str  # a VLLM_CPU_OMP_THREADS_BIND value: "0-1", "nobind", "auto", ...
    dtype: str  # "bfloat16" or "float32"
    bind_source: str  # "auto" (chosen for this CPU) or where the override came from
    dtype_source: str

    def env(self) -> dict[str, str]:
        return {"VLLM_CPU_OMP_THREADS_BIND": self.bind}

    def for_ranks(self, ranks: int, cores: int | None = None) -> "RunSettings":
        """The settings for ``ranks`` CPU workers (tensor parallelism). vLLM binds one CPU list per
        rank (lists separated by ``|``) and, left to ``auto``, refuses more ranks than NUMA nodes.
        Each rank gets its own cores where there are enough; otherwise ranks share cores round
        robin (3 ranks on 2 cores: ``0|1|0``). A ``|``-list or ``nobind`` given by the user is kept."""
        if ranks <= 1 or "|" in self.bind or self.bind == "nobind":
            return self
        cores = cores or cpu_info().cores
        if cores >= ranks:
            per = cores // ranks
            lists = [f"{i * per}-{(i + 1) * per - 1}" if per > 1 else str(i) for i in range(ranks)]
        else:
            lists = [str(i % cores) for i in range(ranks)]
        return RunSettings("|".join(lists), self.dtype, f"{self.bind_source}, split over {ranks} ranks",
                           self.dtype_source)

    def describe(self) -> dict:
        return {"bind": self.bind, "dtype": self.dtype, "bind_source": self.bind_source, "dtype_source": self.dtype_source}

    def line(self, info: CpuInfo) -> str:
        return (f"lcx: machine {info.line()} -> threads bind={self.bind} ({self.bind_source}), "
                f"dtype={self.dtype} ({self.dtype_source}); override with --bind/--dtype or ${BIND_ENV}/${DTYPE_ENV}")


def choose(info: CpuInfo | None = None, *, bind: str | None = None, dtype: str | None = None,
           environ: Mapping[str, str] | None = None) -> RunSettings:
    """Settings for ``info`` (default: this machine); an explicit ``bind``/``dtype`` wins, then the
    environment, then the choice for the CPU."""
    info = info or cpu_info()
    environ = os.environ if environ is None else environ
    if bind:
        bind_source = "--bind"
    elif environ.get(BIND_ENV):
        bind, bind_source = environ[BIND_ENV], f"${BIND_ENV}"
    else:
        bind, bind_source = (f"0-{info.cores - 1}" if info.cores > 1 else "0"), "auto: every core"
    if dtype:
        dtype_source = "--dtype"
    elif environ.get(DTYPE_ENV):
        dtype, dtype_source = environ[DTYPE_ENV], f"${DTYPE_ENV}"
    elif info.bf16_native:
        dtype, dtype_source = "bfloat16", "auto: native bf16 (AVX512-BF16/AMX)"
    else:
        dtype, dtype_source = "float32", "auto: bf16 is emulated on this CPU"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} ({dtype_source}) must be one of {list(DTYPES)}")
    return RunSettings(bind, dtype, bind_source, dtype_source)


def machine_record(settings: RunSettings) -> dict:
    """The machine line every report carries: CPU, ISA flags that matter, cores, binding, dtype, vLLM."""
    from importlib import metadata

    try:
        vllm = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        try:
            vllm = metadata.version("vllm")
        except metadata.PackageNotFoundError:
            vllm = None
    return {**cpu_info().describe(), "settings": settings.describe(), "vllm": vllm}
