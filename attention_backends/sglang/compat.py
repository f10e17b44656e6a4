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


def attention_split() -> dict:
    """How this process splits attention, as SGLang publishes it (``runtime_context.get_parallel()``):
    ``tp_rank``, ``tp_size``, and the attention TP and decode-context-parallel widths. A process
    where nothing is published (SGLang's pools used alone, as in lcx's tests) is rank 0 of 1."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()

    def read(name: str, default: int) -> int:
        try:
            return int(getattr(parallel, name))
        except (RuntimeError, ValueError):  # not published or derived in this process
            return default

    tp_size = read("tp_size", 1)
    return {"tp_rank": read("tp_rank", 0), "tp_size": tp_size, "attn_tp_size": read("attn_tp_size", tp_size),
            "dcp_size": read("dcp_size", 1)}


def total_kv_heads(model_config) -> int | None:
    """The model's KV heads before any split (None: no model config, as in pool-only tests)."""
    if model_config is None:
        return None
    if hasattr(model_config, "get_total_num_kv_heads"):
        return int(model_config.get_total_num_kv_heads())
    text = getattr(model_config, "hf_text_config", None)
    heads = getattr(text, "num_key_value_heads", None)
    return None if heads is None else int(heads)


def register(factory) -> None:
    """Make ``--attention-backend lcx`` (and the prefill/decode variants) parse and build ``factory``."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(factory)


def model_facts(model_config) -> dict:
    """What lcx reads from SGLang's ``ModelConfig`` for serving past the trained length: the
    architecture, the text config (RoPE), the context length served, the trained length (from the
    checkpoint itself when ``--json-model-override-args`` raised ``max_position_embeddings``) and
    the model's name."""
    from pathlib import Path

    text = model_config.hf_text_config
    # A config without the field states no trained length: the served one is taken as it.
    trained = int(getattr(text, "max_position_embeddings", None) or model_config.context_len)
    overrides = getattr(model_config, "model_override_args", None) or {}
    if isinstance(overrides, dict) and "max_position_embeddings" in overrides:
        from transformers import AutoConfig

        original = AutoConfig.from_pretrained(model_config.model_path,
                                              trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)))
        trained = int(original.get_text_config().max_position_embeddings)
    return {"architecture": (getattr(model_config.hf_config, "architectures", None) or ["?"])[0], "text_config": text,
            "context_len": int(model_config.context_len), "trained": trained,
            "name": Path(str(model_config.model_path).rstrip("/")).name}
