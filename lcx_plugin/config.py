"""The one validated lcx configuration.

Shape: ``{"method": NAME, "kernel": KERNEL, ...NAME's parameters}``, flat, for example
``{"method": "streaming", "sink": 64, "window": 1024}``. The method's own dataclass
(``lcx_plugin/selectors/<method>.py``) validates its parameters; ``lcx config --methods``
lists them.

Sources, in the engine process that starts first:
- vLLM: ``--additional-config '{"lcx": {...}}'``;
- anywhere: the env var ``LCX_CONFIG``, inline JSON or the path of a JSON file.
Giving both with different contents is an error, since either could be the one meant.
With neither, lcx serves its recommended composition of methods (``lcx_plugin/recommended.py``);
``{"method": "dense"}`` is the stock arithmetic. Inside a config, a missing ``method`` means dense.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lcx_plugin import selectors
from lcx_plugin.errors import LcxConfigError, user_path
from lcx_plugin.selectors.base import Selector

ENV_VAR = "LCX_CONFIG"
KERNELS = ("auto", "engine", "torch", "triton")
ENGINE_KEYS = ("method", "kernel", "kv_format", "kv_group_size", "kv_high_fraction")
#: Storage formats of the paged cache: the engine's own dtype, quantized pages (kernels/paged/quant.py),
#: or mixed precision (kernels/paged/mixed.py).
KV_FORMATS = ("auto", "int8", "int4", "mixed")
DEFAULT_HIGH_FRACTION = 0.125
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
    kv_format: how the paged cache stores keys and values, under every method.
        "auto": the engine's cache dtype (bf16 for a bf16 model).
        "int8", "int4": quantized pages, per token and KV head in groups of ``kv_group_size``
            channels with a bfloat16 scale and zero point each; the engine's page shrinks, so its
            reported KV capacity grows (about 1.9x and 3.6x at head_dim 64). Quantized pages are
            read by lcx's kernels only ("auto" takes the torch twin on CPU).
        "mixed": MiKV-style mixed precision: every token int4, and in each page a pool of int8
            slots for its most important tokens (attention sinks, and the tokens the end of each
            prompt chunk attends to most); about 2.8x the KV tokens of bf16 at head_dim 64.
    kv_group_size: channels per scale group of a quantized format; null (the default) is the
        whole head, the smallest cache.
    kv_high_fraction: with "mixed", the share of each page's tokens that can hold an int8 copy
        (default 0.125; in (0, 0.5]).
    """

    selector: Selector = field(default_factory=_default_selector)
    kernel: str = "auto"
    kv_format: str = "auto"
    kv_group_size: int | None = None
    kv_high_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise LcxConfigError(f"lcx config: kernel={self.kernel!r} is not one of {list(KERNELS)}")
        if self.kv_format not in KV_FORMATS:
            raise LcxConfigError(f"lcx config: kv_format={self.kv_format!r} is not one of {list(KV_FORMATS)}")
        g = self.kv_group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= 1024):
            raise LcxConfigError(f"lcx config: kv_group_size={g!r} must be an integer in [1, 1024] or null "
                                 "(the whole head)")
        if g is not None and self.kv_format == "auto":
            raise LcxConfigError("lcx config: kv_group_size applies to quantized pages; set kv_format to "
                                 "'int8', 'int4' or 'mixed', or drop kv_group_size")
        f = self.kv_high_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 0.5):
            raise LcxConfigError(f"lcx config: kv_high_fraction={f!r} must be a number in (0, 0.5] or null "
                                 f"(default {DEFAULT_HIGH_FRACTION})")
        if f is not None and self.kv_format != "mixed":
            raise LcxConfigError("lcx config: kv_high_fraction applies to mixed-precision pages; set kv_format to "
                                 "'mixed', or drop kv_high_fraction")
        if self.mixed and f is None:
            object.__setattr__(self, "kv_high_fraction", DEFAULT_HIGH_FRACTION)  # one config, however it was spelt
        if self.kernel == "engine" and self.quantized:
            raise LcxConfigError(f"lcx config: kernel='engine' is vLLM's CPU op, which cannot read {self.kv_format} "
                                 "pages; use kernel 'auto' (lcx's torch twin on CPU, Triton on GPUs)")

    def implementation(self, device: "torch.device | str", engine_op: bool) -> str:
        """What computes attention on ``device``: "engine" (the engine's own CPU op, where
        ``engine_op`` says the engine has one lcx can drive), "torch" or "triton". Both adapters
        resolve ``kernel`` here; ``auto`` takes Triton on CUDA, else the engine's op for
        unquantized pages where there is one, else the torch twin."""
        kind = device if isinstance(device, str) else device.type
        if self.kernel == "auto":
            if kind == "cuda":
                return "triton"
            return "engine" if engine_op and kind == "cpu" and not self.quantized else "torch"
        if self.kernel == "engine" and not engine_op:
            raise LcxConfigError("lcx config: kernel 'engine' is vLLM's CPU op; this engine has none lcx drives, "
                                 "use 'auto', 'torch' or 'triton'")
        if self.kernel == "engine" and kind != "cpu":
            raise LcxConfigError("lcx config: kernel='engine' is the vLLM CPU build's op; use 'auto' or 'triton' on GPUs")
        return self.kernel

    @property
    def quantized(self) -> bool:
        return self.kv_format != "auto"

    @property
    def kv_bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.kv_format)

    @property
    def mixed(self) -> bool:
        return self.kv_format == "mixed"

    @property
    def high_fraction(self) -> float:
        return float(self.kv_high_fraction or DEFAULT_HIGH_FRACTION)

    def group_size(self, head_dim: int) -> int:
        return min(self.kv_group_size or head_dim, head_dim)

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
        kv_format = data.get("kv_format", "auto")
        if not isinstance(kv_format, str):
            raise LcxConfigError(f"lcx config from {source}: kv_format={kv_format!r} must be a string, one of "
                                 f"{list(KV_FORMATS)}")
        params = {k: v for k, v in data.items() if k not in ENGINE_KEYS}
        selector = selectors.get(method).from_dict(params, source, ENGINE_KEYS)
        try:
            return cls(selector=selector, kernel=kernel, kv_format=kv_format, kv_group_size=data.get("kv_group_size"),
                       kv_high_fraction=data.get("kv_high_fraction"))
        except LcxConfigError as e:
            raise LcxConfigError(str(e).replace("lcx config:", f"lcx config from {source}:", 1)) from None

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "kernel": self.kernel, **self.selector.to_dict()}
        if self.quantized:
            out.update(kv_format=self.kv_format, kv_group_size=self.kv_group_size)
        if self.mixed:
            out.update(kv_high_fraction=self.kv_high_fraction)
        return out

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.to_dict().items())


def _parse_env(raw: str) -> tuple[Any, str]:
    text = raw.strip()
    if text.startswith("{") or text in ("null", "[]") or text.startswith("["):
        source = f"${ENV_VAR} (inline JSON)"
    else:
        path = user_path(text, f"${ENV_VAR}: the config file")
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


def resolve_config(additional_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                   model: str | None = None, engine: str = "vllm") -> LcxConfig:
    """Build the config from vLLM's additional_config and/or ``$LCX_CONFIG``; with neither, the
    recommended default for ``model`` (the served model's name or path) on ``engine``."""
    environ = os.environ if environ is None else environ
    engine_given, env_given = _given(additional_config, environ)
    a = LcxConfig.from_dict(additional_config["lcx"], "--additional-config") if engine_given else None
    b = None
    if env_given:
        data, source = _parse_env(environ[ENV_VAR])
        b = LcxConfig.from_dict(data, source)
    if a is not None and b is not None and a != b:
        raise LcxConfigError(f"lcx config given twice and they differ: --additional-config {a.to_dict()} vs "
                             f"${ENV_VAR} {b.to_dict()}; keep one")
    if a is not None or b is not None:
        return a or b
    from lcx_plugin.recommended import SOURCE, recommended

    return LcxConfig.from_dict(recommended(model, engine), SOURCE)


def _given(additional_config: Mapping[str, Any] | None, environ: Mapping[str, str]) -> tuple[bool, bool]:
    """Whether vLLM's additional_config, and whether ``$LCX_CONFIG``, carry an lcx config."""
    return bool(additional_config) and "lcx" in additional_config, bool(environ.get(ENV_VAR, "").strip())


def is_default(additional_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """No config given anywhere: lcx serves its recommended default."""
    return not any(_given(additional_config, os.environ if environ is None else environ))
