"""Everything lcx uses from SGLang, in one place: the supported version and the names imported.

lcx's SGLang adapter is written against SGLang 0.5.23. Another version may rename what is used
here; then ``check_version`` says so once, at registration, and lcx registers nothing.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED = ("0.5.23",)
BACKEND_NAME = "lcx"


class UnsupportedSglang(RuntimeError):
    pass


def check_version() -> str:
    try:
        found = version("sglang")
    except PackageNotFoundError as e:
        raise UnsupportedSglang("SGLang is not installed") from e
    if found not in SUPPORTED:
        raise UnsupportedSglang(f"lcx's SGLang adapter supports sglang {', '.join(SUPPORTED)}; found {found}")
    return found


def attention_backend_base():
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    return AttentionBackend


def kv_write_loc(loc):
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    return KVWriteLoc(loc, None)


def register(factory) -> None:
    """Make ``--attention-backend lcx`` (and the prefill/decode variants) parse and build ``factory``."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(factory)
