"""Give each lcx layer with a head split a companion KV-cache group for its streaming heads, and
each lcx layer with quantized pages a packed KV-cache spec.

Replaces: ``Attention.__init__`` (vLLM's attention layer), wrapped; and
``Platform.register_custom_kv_cache_specs`` (the current platform's class), chained.
Why: vLLM has no per-head KV specs. A layer's streaming heads need a cache that keeps only sinks
and a window, managed apart from the retrieval heads' full cache, so that the memory is really
saved and vLLM's own capacity figure shows it. After the original ``__init__``, the wrapper asks
``attention_backends/vllm/kv_split.attach`` to shrink the layer's spec to its retrieval heads and
register the companion layer; layers on other backends, or lcx layers without a head split, are
left alone. The platform hook registers the companion's spec and manager in every process, right
after vLLM's own.
Supported: vLLM >=0.32,<0.33. Applied in every process by the plugin entry point.
"""
from __future__ import annotations

from lcx_plugin.attention_backends.vllm import compat

NAME = "vllm_kv_split"


def apply(backend_name: str) -> None:
    """Idempotent; refuses outside the supported vLLM versions."""
    compat.check_version(NAME)
    from lcx_plugin.attention_backends.vllm import kv_split

    kv_split.install()
    attention_cls = compat.attention_layer_class()
    if is_applied():
        return
    original = attention_cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        backend = getattr(self, "attn_backend", None)
        if backend is not None and backend.get_name() == backend_name:
            from vllm.config import get_current_vllm_config

            kv_split.attach(self, get_current_vllm_config())

    __init__._lcx_wrapped = True
    __init__.__wrapped__ = original
    attention_cls.__init__ = __init__


def is_applied() -> bool:
    return getattr(compat.attention_layer_class().__init__, "_lcx_wrapped", False)
