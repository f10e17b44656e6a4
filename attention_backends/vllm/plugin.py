"""vLLM plugin entry point (``vllm.general_plugins``).

vLLM calls ``register()`` in every process it starts (API server, EngineCore, workers), so
it is idempotent and cheap: it registers the ``LCX`` attention backend and applies the
version-guarded patches. It never raises into an engine that is not using lcx: on an
unsupported vLLM it logs why and registers nothing, so ``--attention-backend lcx`` then fails
with vLLM's own "Unknown attention backend" after lcx's explanation.
"""
from __future__ import annotations

from lcx_plugin.log import get_logger

BACKEND_NAME = "LCX"
BACKEND_PATH = "lcx_plugin.attention_backends.vllm.backend.LcxAttentionBackend"
logger = get_logger()
_done = False


def restore_member(name: str):
    """Unpickling hook for the ``LCX`` enum member (see patches/vllm_backend_enum_pickle.py)."""
    register()
    from . import compat

    return compat.backend_enum()[name]


def register() -> None:
    global _done
    if _done:
        return
    from lcx_plugin.patches import (vllm_backend_enum_pickle, vllm_cpu_backend_selection, vllm_kv_split,
                                     vllm_step_identity)
    from lcx_plugin.patches._guard import UnsupportedEngineVersion

    from . import compat

    try:
        compat.check_version()
        enum = compat.backend_enum()
        if BACKEND_NAME not in enum.__members__:
            compat.register_backend(BACKEND_NAME, BACKEND_PATH)
        vllm_backend_enum_pickle.apply(enum[BACKEND_NAME], restore_member)
        vllm_cpu_backend_selection.apply(BACKEND_NAME)
        vllm_step_identity.apply()
        vllm_kv_split.apply(BACKEND_NAME)
    except UnsupportedEngineVersion as e:
        logger.warning("lcx is not active: %s", e)
    _done = True
