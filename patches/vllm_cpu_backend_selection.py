"""Let vLLM's CPU platform honour ``--attention-backend lcx``.

Replaces: ``vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls`` and
``CpuPlatform.check_and_update_config`` (classmethods), wrapped.
Why: on CPU the first returns CPU_ATTN for any selected backend, only logging
"Cannot use ... backend on CPU". The wrapper answers for the LCX member alone, after the
same ``validate_configuration`` check the CUDA platform makes, and defers to the original
for everything else. The second runs where the engine config is built (``vllm serve``'s API
server process): after the original, with ``--attention-backend lcx`` selected, the same lcx
checks run there (``backend.lcx_reasons``), so a bad lcx config stops ``vllm serve`` before it
spawns an engine core and a worker (9 s instead of 29-34 s on 2 cores), with the same message.
Supported: vLLM >=0.32,<0.33. Spawned engine processes do not inherit monkeypatches, so
the plugin entry point applies this in every process.
"""
from __future__ import annotations

from lcx_plugin.attention_backends.vllm import compat
from lcx_plugin.log import get_logger

NAME = "vllm_cpu_backend_selection"
logger = get_logger()


def apply(backend_name: str = "LCX") -> None:
    """Idempotent; refuses outside the supported vLLM versions."""
    compat.check_version(NAME)
    platform = compat.cpu_platform_class()
    if is_applied():
        return
    original_fn = platform.__dict__["get_attn_backend_cls"].__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None or getattr(selected_backend, "name", None) != backend_name:
            return original_fn(cls, selected_backend, attn_selector_config, num_heads)
        backend_cls = selected_backend.get_class()
        reasons = backend_cls.validate_configuration(device_capability=None, **attn_selector_config._asdict())
        if reasons:
            raise ValueError(f"Selected backend {backend_name} is not valid for this configuration. Reason: {reasons}")
        logger.info("Using %s backend on CPU.", backend_name)
        return selected_backend.get_path()

    get_attn_backend_cls._lcx_wrapped = True
    get_attn_backend_cls.__wrapped__ = original_fn
    platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)

    original_check = platform.__dict__["check_and_update_config"].__func__

    def check_and_update_config(cls, vllm_config) -> None:
        original_check(cls, vllm_config)
        selected = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
        if getattr(selected, "name", None) == backend_name:
            from lcx_plugin.attention_backends.vllm.backend import lcx_reasons

            with compat.current_config(vllm_config):  # reading the model's RoPE builds vLLM's rotary op
                reasons = lcx_reasons(vllm_config)
            if reasons:
                raise ValueError(f"Selected backend {backend_name} is not valid for this configuration. "
                                 f"Reason: {reasons}")

    check_and_update_config._lcx_wrapped = True
    check_and_update_config.__wrapped__ = original_check
    platform.check_and_update_config = classmethod(check_and_update_config)


def is_applied() -> bool:
    members = compat.cpu_platform_class().__dict__
    return all(getattr(members[name].__func__, "_lcx_wrapped", False)
               for name in ("get_attn_backend_cls", "check_and_update_config"))
