"""Make the dynamically registered ``AttentionBackendEnum.LCX`` member survive pickling.

Replaces: nothing in vLLM's code; it gives the one enum member lcx adds its own
``__reduce_ex__``.
Why: vLLM's EngineCore process unpickles the VllmConfig (which holds the selected backend)
before it loads plugins, so the member does not exist yet and unpickling fails with
"'LCX' is not a valid AttentionBackendEnum". Pickling the member as a call to the plugin's
``restore`` function (any importable module-level function that registers the backend and
returns the member) makes the unpickler import lcx, register the backend, and return it.
Supported: vLLM >=0.32,<0.33 (the dynamic ``AttentionBackendEnum.register`` API).
"""
from __future__ import annotations

from typing import Callable

from lcx_plugin.attention_backends.vllm import compat

NAME = "vllm_backend_enum_pickle"


def apply(member, restore: Callable[[str], object]) -> None:
    """Idempotent; refuses outside the supported vLLM versions. ``restore(name)`` must be a
    module-level function (pickle stores it by reference)."""
    compat.check_version(NAME)
    if getattr(member, "_lcx_pickle_patched", False):
        return

    def reduce_ex(protocol):
        return (restore, (member.name,))

    # Instance attributes: pickle looks __reduce_ex__ up on the object itself.
    member.__reduce_ex__ = reduce_ex
    member._lcx_pickle_patched = True
