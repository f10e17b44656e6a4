"""The LCX backend passes vLLM's own selection checks (as on a CUDA platform) and reports why not when it can't."""
import pytest
import torch
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.selector import AttentionSelectorConfig

from lcx_plugin.attention_backends.vllm.backend import LcxAttentionBackend
from lcx_plugin.config import LcxConfig

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


def _implementation(kernel, device, engine_op=True, kv_format="auto"):
    return LcxConfig.from_dict({"method": "dense", "kernel": kernel, "kv_format": kv_format}).implementation(
        torch.device(device), engine_op=engine_op)


def test_kernel_resolution_by_device():
    assert _implementation("auto", "cuda") == "triton"
    assert _implementation("auto", "cpu") == "engine"
    assert _implementation("auto", "cpu", kv_format="int8") == "torch"  # the engine's op cannot read int8 pages
    assert _implementation("auto", "cpu", engine_op=False) == "torch"  # SGLang: no engine op lcx drives
    assert _implementation("auto", "cuda", engine_op=False) == "triton"
    assert _implementation("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="kernel='engine' is the vLLM CPU build's op"):
        _implementation("engine", "cuda")
    with pytest.raises(ValueError, match="this engine has none lcx drives"):
        _implementation("engine", "cpu", engine_op=False)


def test_triton_kernel_is_refused_at_startup_without_a_gpu(monkeypatch):
    from lcx_plugin.attention_backends.vllm import backend
    from lcx_plugin.config import LcxConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backend, "lcx_config_of", lambda vllm_config: LcxConfig(kernel="triton"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("kernel='triton' needs a CUDA GPU" in r for r in _reasons())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the tests run the kernel interpreted inside the engine
    assert _reasons() == []


def test_a_bad_config_is_one_reason_at_backend_selection(monkeypatch):
    from lcx_plugin.attention_backends.vllm import backend
    from lcx_plugin.config import LcxConfig

    monkeypatch.setattr(backend, "lcx_config_of",
                        lambda vllm_config: LcxConfig.from_dict({"method": "streaming", "sink": -2}))
    assert _reasons() == ["lcx config: sink=-2 must be >= 0"]


def _engine_config(**kw):
    from vllm.engine.arg_utils import EngineArgs

    from lcx_plugin.attention_backends.vllm.plugin import register
    from lcx_plugin.harness.model import prepare

    register()
    return EngineArgs(model=str(prepare()), max_model_len=2048, enforce_eager=True, **kw).create_engine_config()


def test_a_bad_config_stops_where_the_engine_config_is_built(tmp_path):
    """``vllm serve``'s API server builds the config before it starts any engine process: the
    lcx checks run there (patches/vllm_cpu_backend_selection.py), with the backend-selection message."""
    with pytest.raises(ValueError, match=r"Selected backend LCX is not valid for this configuration\. Reason: "
                                         r"\[\"lcx config from --additional-config: unknown key\(s\) \['methdo'\]"):
        _engine_config(attention_backend="lcx", additional_config={"lcx": {"methdo": "dense"}})
    tsv = tmp_path / "full_attention_heads.tsv"  # DuoAttention's layout, for a model of 2 layers x 3 KV heads
    tsv.write_text("0.1\t0.9\t0.2\n0.8\t0.05\t0.7\n")
    with pytest.raises(ValueError, match=r"does not fit the served model"):
        _engine_config(attention_backend="lcx", additional_config={"lcx": {"method": "head_split", "pattern": str(tsv)}})


def test_a_good_config_and_other_backends_build_as_before():
    assert _engine_config(attention_backend="lcx", additional_config={"lcx": {"method": "streaming"}}) is not None
    assert _engine_config(additional_config={"lcx": {"methdo": "dense"}}) is not None  # lcx not selected: not read
