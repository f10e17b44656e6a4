"""The one validated lcx configuration.

Sources, in the engine process that starts first:
- vLLM: ``--additional-config '{"lcx": {...}}'``;
- anywhere: the env var ``LCX_CONFIG``, inline JSON or the path of a JSON file.
Giving both with different contents is an error, since either could be the one meant.
The default is dense attention, which must be token-identical to the stock backend.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

ENV_VAR = "LCX_CONFIG"
METHODS = ("dense",)
KERNELS = ("auto", "engine", "torch", "triton")


class LcxConfigError(ValueError):
    """Raised once, at startup, for any bad lcx configuration."""


@dataclass(frozen=True)
class LcxConfig:
    """lcx settings.

    method: the long-context method; "dense" attends to every cached token.
    kernel: which implementation computes attention.
        "auto": Triton on CUDA; on CPU the engine's own paged op, driven by lcx.
        "triton": lcx's Triton kernel. "torch": lcx's torch twin (any device).
        "engine": the engine's paged op (vLLM CPU build only).
    """

    method: str = "dense"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LcxConfigError(f"lcx config: method={self.method!r} is not one of {list(METHODS)}")
        if self.kernel not in KERNELS:
            raise LcxConfigError(f"lcx config: kernel={self.kernel!r} is not one of {list(KERNELS)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "LcxConfig":
        if not isinstance(data, Mapping):
            raise LcxConfigError(f"lcx config from {source} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LcxConfigError(
                f"lcx config from {source}: unknown key(s) {unknown}; valid keys are {sorted(known)}"
            )
        for f in fields(cls):
            if f.name in data and not isinstance(data[f.name], type(getattr(cls, f.name))):
                raise LcxConfigError(
                    f"lcx config from {source}: {f.name}={data[f.name]!r} must be a "
                    f"{type(getattr(cls, f.name)).__name__}"
                )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_env(raw: str) -> tuple[dict, str]:
    text = raw.strip()
    if text.startswith("{"):
        source = f"${ENV_VAR} (inline JSON)"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise LcxConfigError(f"${ENV_VAR}={raw!r} is neither inline JSON nor an existing file")
        source = f"${ENV_VAR} file {path}"
        text = path.read_text()
    try:
        return json.loads(text), source
    except json.JSONDecodeError as e:
        raise LcxConfigError(f"lcx config from {source} is not valid JSON: {e}") from None


def resolve_config(additional_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> LcxConfig:
    """Build the config from vLLM's additional_config and/or ``$LCX_CONFIG``."""
    environ = os.environ if environ is None else environ
    from_engine = None
    if additional_config and "lcx" in additional_config:
        from_engine = additional_config["lcx"]
    from_env, env_source = (None, "")
    if environ.get(ENV_VAR, "").strip():
        from_env, env_source = _parse_env(environ[ENV_VAR])
    if from_engine is not None and from_env is not None:
        a = LcxConfig.from_dict(from_engine, "--additional-config")
        b = LcxConfig.from_dict(from_env, env_source)
        if a != b:
            raise LcxConfigError(
                f"lcx config given twice and they differ: --additional-config {a.to_dict()} vs "
                f"{env_source} {b.to_dict()}; keep one"
            )
        return a
    if from_engine is not None:
        return LcxConfig.from_dict(from_engine, "--additional-config")
    if from_env is not None:
        return LcxConfig.from_dict(from_env, env_source)
    return LcxConfig()
