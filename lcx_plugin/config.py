"""The one validated lcx configuration.

Shape: ``{"method": NAME, "kernel": KERNEL, ...NAME's parameters}``, flat, for example
``{"method": "streaming", "sink": 64, "window": 1024}``. The method's own dataclass
(``lcx_plugin/selectors/<method>.py``) validates its parameters; ``lcx config --help-methods``
lists them.

Sources, in the engine process that starts first:
- vLLM: ``--additional-config '{"lcx": {...}}'``;
- anywhere: the env var ``LCX_CONFIG``, inline JSON or the path of a JSON file.
Giving both with different contents is an error, since either could be the one meant.
The default is dense attention, which is token-identical to the stock backend.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lcx_plugin import selectors
from lcx_plugin.errors import LcxConfigError
from lcx_plugin.selectors.base import Selector

ENV_VAR = "LCX_CONFIG"
KERNELS = ("auto", "engine", "torch", "triton")
ENGINE_KEYS = ("method", "kernel")
MAX_CONFIG_BYTES = 1 << 20

__all__ = ["ENV_VAR", "KERNELS", "LcxConfig", "LcxConfigError", "resolve_config"]


def _default_selector() -> Selector:
    return selectors.get("dense")()


@dataclass(frozen=True)
class LcxConfig:
    """lcx settings.

    selector: the long-context method with its validated parameters.
    kernel: which implementation computes attention.
        "auto": Triton on CUDA; on vLLM's CPU build, the engine's own op for dense work and lcx's
            torch twin for selections, both over the engine's cache layout.
        "triton": lcx's Triton kernel (CUDA; on CPU only under TRITON_INTERPRET=1).
        "torch": lcx's torch twin for everything, over lcx's own page layout.
        "engine": as "auto" on vLLM's CPU build.
    """

    selector: Selector = field(default_factory=_default_selector)
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise LcxConfigError(f"lcx config: kernel={self.kernel!r} is not one of {list(KERNELS)}")

    @property
    def method(self) -> str:
        return self.selector.name

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> "LcxConfig":
        if not isinstance(data, Mapping):
            kind = "null" if data is None else type(data).__name__
            raise LcxConfigError(f"lcx config from {source} must be a JSON object such as "
                                 f'{{"method": "dense"}}, got {kind}')
        method = data.get("method", "dense")
        if not isinstance(method, str):
            raise LcxConfigError(f"lcx config from {source}: method={method!r} must be a string, one of {selectors.names()}")
        kernel = data.get("kernel", "auto")
        if not isinstance(kernel, str):
            raise LcxConfigError(f"lcx config from {source}: kernel={kernel!r} must be a string, one of {list(KERNELS)}")
        params = {k: v for k, v in data.items() if k not in ENGINE_KEYS}
        selector = selectors.get(method).from_dict(params, source, ENGINE_KEYS)
        return cls(selector=selector, kernel=kernel)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "kernel": self.kernel, **self.selector.to_dict()}

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.to_dict().items())


def _parse_env(raw: str) -> tuple[Any, str]:
    text = raw.strip()
    if text.startswith("{") or text in ("null", "[]") or text.startswith("["):
        source = f"${ENV_VAR} (inline JSON)"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise LcxConfigError(f"${ENV_VAR}={raw!r} is neither inline JSON nor an existing file")
        source = f"${ENV_VAR} file {path}"
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise LcxConfigError(f"lcx config from {source} is {path.stat().st_size} bytes; a config is at most "
                                 f"{MAX_CONFIG_BYTES} bytes")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LcxConfigError(f"lcx config from {source} is not UTF-8 text: {e}") from None
    try:
        return json.loads(text), source
    except json.JSONDecodeError as e:
        raise LcxConfigError(f"lcx config from {source} is not valid JSON: {e}") from None


def resolve_config(additional_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> LcxConfig:
    """Build the config from vLLM's additional_config and/or ``$LCX_CONFIG``."""
    environ = os.environ if environ is None else environ
    engine_given = bool(additional_config) and "lcx" in additional_config
    env_given = bool(environ.get(ENV_VAR, "").strip())
    a = LcxConfig.from_dict(additional_config["lcx"], "--additional-config") if engine_given else None
    b = None
    if env_given:
        data, source = _parse_env(environ[ENV_VAR])
        b = LcxConfig.from_dict(data, source)
    if a is not None and b is not None and a != b:
        raise LcxConfigError(f"lcx config given twice and they differ: --additional-config {a.to_dict()} vs "
                             f"${ENV_VAR} {b.to_dict()}; keep one")
    return a or b or LcxConfig()
