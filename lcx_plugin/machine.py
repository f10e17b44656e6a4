"""What this machine's CPU can do, as far as lcx's choices depend on it.

``cpu_info()`` reads ``/proc/cpuinfo`` (model, ISA flags) and the cores this process may use.
``LCX_CPU_FLAGS`` (a comma list) replaces the detected flags: tests use it to act out other
CPUs, and nothing in the engine reads it.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

from lcx_plugin.log import get_logger

FLAGS_ENV = "LCX_CPU_FLAGS"
#: The flags that decide lcx's settings and appear in every report's machine line.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int  # cores this process may run on

    @property
    def bf16_native(self) -> bool:
        """bf16 matrix work in hardware: AVX512-BF16 or AMX. Elsewhere it is emulated (slow)."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    def describe(self) -> dict:
        d = {"cpu": self.model, "cores": self.cores, "machine": platform.machine()}
        d.update({f: f in self.flags for f in ("avx2", "avx512f", "avx512_bf16")})
        d["amx"] = "amx_bf16" in self.flags
        return d

    def line(self) -> str:
        isa = " ".join(f for f in REPORTED_FLAGS if f in self.flags) or "no AVX2"
        return f"{self.model} ({isa}; {self.cores} cores)"


def _read_cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


@functools.cache
def cpu_info() -> CpuInfo:
    model, flags = _read_cpuinfo()
    override = os.environ.get(FLAGS_ENV)
    if override is not None:
        flags = {f.strip() for f in override.split(",") if f.strip()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model, frozenset(flags), cores)


_warned = False


def warn_if_bf16_emulated(dtype: torch.dtype) -> bool:
    """Log once per process when bf16 runs on a CPU that only emulates it. Changes nothing."""
    global _warned
    info = cpu_info()
    if dtype != torch.bfloat16 or info.bf16_native or _warned:
        return False
    _warned = True
    get_logger().warning(
        "lcx: this CPU (%s) has neither AVX512-BF16 nor AMX, so bfloat16 matrix work is emulated, about 3.5x "
        "slower than float32 here. Serve with --dtype float32 for speed (lcx leaves the choice to you).", info.line())
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
