"""SGLang plugin entry point (``sglang.srt.plugins``).

SGLang's ``load_plugins()`` runs this in the launcher, the scheduler and the detokenizer, before
argument parsing: it adds ``lcx`` to the attention-backend choices and registers the backend
factory. Idempotent and cheap; on an unsupported SGLang it logs why and registers nothing.
"""
from __future__ import annotations

from lcx_plugin.log import get_logger

logger = get_logger()
_done = False


def create_backend(model_runner):
    from .backend import LcxSglangBackend

    return LcxSglangBackend(model_runner)


def register() -> None:
    global _done
    if _done:
        return
    from . import compat

    try:
        compat.check_version()
        compat.register(create_backend)
    except compat.UnsupportedSglang as e:
        logger.warning("lcx is not active in SGLang: %s", e)
    _done = True
