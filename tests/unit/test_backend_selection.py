"""The LCX backend passes vLLM's own selection checks (as on a CUDA platform) and reports why not when it can't."""
import pytest
import torch
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.selector import AttentionSelectorConfig

from lcx_plugin.attention_backends.vllm.backend import LcxAttentionBackend, resolve_kernel

H100 = DeviceCapability(9, 0)


def _reasons(**overrides):
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16)
    return LcxAttentionBackend.validate_configuration(device_capability=H100, **cfg._replace(**overrides)._asdict())


def test_valid_on_an_sm90_selection():
    assert _reasons() == []
    assert _reasons(head_size=128, dtype=torch.float16) == []


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"head_size": 72}, "head_size not supported"),
        ({"use_mla": True}, "MLA not supported"),
        ({"has_sink": True}, "attention sinks not supported"),
        ({"has_sliding_window": True}, "sliding window not supported"),
        ({"block_size": 8}, "block_size not supported"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype not supported"),
    ],
)
def test_unsupported_combinations_are_named(overrides, reason):
    assert reason in _reasons(**overrides)


def test_kernel_resolution_by_device():
    assert resolve_kernel("auto", torch.device("cuda")) == "triton"
    assert resolve_kernel("auto", torch.device("cpu")) == "engine"
    assert resolve_kernel("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="kernel='engine' is the vLLM CPU build's op"):
        resolve_kernel("engine", torch.device("cuda"))
