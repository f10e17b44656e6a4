"""Serving past a model's trained length, engine-neutral: which models' RoPE lcx can re-apply, the
RoPE read from a Hugging Face config, and the startup refusal's reasons. Each engine adapter reads
its own config objects and hands the plain values here."""
from __future__ import annotations

from typing import Callable

from lcx_plugin.kernels.paged.rope import Rope

#: Architectures whose model code applies neox-style RoPE to every layer's q and k (the pairing
#: lcx re-applies); others are refused for ``extrapolate`` at startup.
NEOX_ROPE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
#: RoPE types whose rotation is a plain rotation by ``position x inv_freq``: re-applying it by a
#: position difference is exact. (YaRN scales cos/sin, dynamic NTK changes with the length, mrope
#: has several position streams: none composes that way.)
REPOSITIONABLE_ROPE = ("default", "llama3", "linear")


def rope_parameters(text_config) -> dict:
    """The config's RoPE parameters (``rope_parameters``, or the older ``rope_theta`` + ``rope_scaling``)."""
    params = dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params and getattr(text_config, "rope_theta", None) is not None:
        params["rope_theta"] = text_config.rope_theta
    return params


def check_architecture(architecture: str) -> None:
    if architecture not in NEOX_ROPE_ARCHITECTURES:
        raise ValueError(f"lcx config: extrapolate re-applies RoPE, which lcx knows for {list(NEOX_ROPE_ARCHITECTURES)}; "
                         f"{architecture} is not among them")


def check_rope_type(kind: str, supported: tuple[str, ...] = REPOSITIONABLE_ROPE) -> None:
    if kind not in supported:
        raise ValueError(f"lcx config: extrapolate cannot re-position rope_type {kind!r} here (supported: "
                         f"{list(supported)}): its rotation does not compose by position differences, or lcx does not "
                         "read its frequencies on this engine")


def rope_from_config(text_config, head_dim: int, architecture: str) -> Rope:
    """The RoPE of a neox-style model from its Hugging Face text config: ``default`` and ``linear``
    types (frequencies from ``rope_theta``, a partial rotary factor, a linear factor); raises
    ValueError naming what cannot be re-positioned. (vLLM's adapter reads vLLM's own rotary module
    instead, which also gives ``llama3``'s frequencies.)"""
    check_architecture(architecture)
    params = rope_parameters(text_config)
    kind = params["rope_type"]
    check_rope_type(kind, ("default", "linear"))
    theta = float(params.get("rope_theta", 10000.0))
    rotary = int(head_dim * float(getattr(text_config, "partial_rotary_factor", 1.0) or 1.0))
    scale = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
    return Rope.standard(head_dim, theta, rotary_dim=rotary, neox=True, position_scale=scale)


def length_reasons(selector, *, max_len: int, trained: int, model_name: str, block_size: int,
                   read_rope: Callable[[], object], length_flag: str = "--max-model-len") -> list[str]:
    """Why ``selector`` cannot serve ``max_len`` positions (empty: it can): past the trained length
    only an extrapolating method may, and only if what one query attends fits in it.
    ``read_rope()`` reads the model's RoPE, raising ValueError where it cannot be re-applied."""
    extrapolate = bool(getattr(selector, "extrapolate", False))
    if max_len > trained and not extrapolate:
        return [f"lcx config: {length_flag} {max_len} is past {model_name}'s trained length of {trained} positions, and "
                f"method {selector.name!r} would attend at positions the model never saw. Serve within {trained}, or "
                "use a method that extrapolates: {\"method\": \"hip\", \"dense_layers\": [], \"extrapolate\": true}, "
                "{\"method\": \"token_select\", \"prefill\": \"select\", \"extrapolate\": true} "
                "or {\"method\": \"streaming\", \"extrapolate\": true}"]
    if not extrapolate:
        return []
    if int(getattr(selector, "min_context", 0)) > trained:
        return [f"lcx config: min_context {selector.min_context} leaves contexts up to that length dense, at absolute "
                f"positions past {model_name}'s trained length of {trained}: lower it to at most {trained}"]
    try:
        read_rope()
    except ValueError as e:
        return [str(e)]
    longest = selector.longest_attended(max_len, block_size)
    if longest > trained:
        return [f"lcx config: at {length_flag} {max_len} one query of {selector.name!r} attends up to {longest} "
                f"tokens (sink + window + budget), past {model_name}'s trained length of {trained}: lower them"]
    return []
