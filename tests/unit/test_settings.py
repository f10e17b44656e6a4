"""Machine-dependent settings for lcx's own runs, on fake CPU descriptions: binding, dtype, overrides,
and the bf16-emulation warning."""
import pytest
import torch

from lcx_plugin import machine
from lcx_plugin.harness.settings import choose
from lcx_plugin.machine import CpuInfo

AVX2_EPYC = CpuInfo("AMD EPYC (AVX2 only)", frozenset({"avx2", "fma"}), 2)
AVX512_NO_BF16 = CpuInfo("Intel Xeon (Skylake)", frozenset({"avx2", "avx512f"}), 2)
AVX512_BF16 = CpuInfo("AMD EPYC (Zen 4)", frozenset({"avx2", "avx512f", "avx512_bf16"}), 2)
AMX_XEON = CpuInfo("Intel Xeon (Sapphire Rapids)", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), 4)


@pytest.mark.parametrize("cpu, bind, dtype", [
    (AVX2_EPYC, "0-1", "float32"),
    (AVX512_NO_BF16, "0-1", "float32"),
    (AVX512_BF16, "0-1", "bfloat16"),
    (AMX_XEON, "0-3", "bfloat16"),
    (CpuInfo("one core", frozenset({"avx2"}), 1), "0", "float32"),
])
def test_choice_per_cpu(cpu, bind, dtype):
    s = choose(cpu, environ={})
    assert (s.bind, s.dtype) == (bind, dtype)
    assert s.env() == {"VLLM_CPU_OMP_THREADS_BIND": bind}
    assert cpu.model in s.line(cpu) and f"dtype={dtype}" in s.line(cpu)


@pytest.mark.parametrize("cores, want", [(1, "0|0|0"), (2, "0|1|0"), (3, "0|1|2"), (7, "0-1|2-3|4-5")])
def test_tensor_parallel_ranks_get_one_cpu_list_each(cores, want):
    """vLLM binds one list per rank and refuses auto binding for more ranks than NUMA nodes."""
    s = choose(AVX2_EPYC, environ={}).for_ranks(3, cores=cores)
    assert s.bind == want and s.env() == {"VLLM_CPU_OMP_THREADS_BIND": want}
    assert "split over 3 ranks" in s.bind_source and s.dtype == "float32"
    assert choose(AVX2_EPYC, environ={}).for_ranks(1).bind == "0-1"
    for given in ("0|1|1", "nobind"):
        assert choose(AVX2_EPYC, bind=given, environ={}).for_ranks(3).bind == given


def test_explicit_override_wins_then_environment():
    env = {"LCX_CPU_BIND": "nobind", "LCX_DTYPE": "bfloat16"}
    s = choose(AVX2_EPYC, environ=env)
    assert (s.bind, s.dtype, s.bind_source, s.dtype_source) == ("nobind", "bfloat16", "$LCX_CPU_BIND", "$LCX_DTYPE")
    s = choose(AVX2_EPYC, bind="0", dtype="float32", environ=env)
    assert (s.bind, s.dtype, s.bind_source, s.dtype_source) == ("0", "float32", "--bind", "--dtype")
    with pytest.raises(ValueError, match="dtype='float16'"):
        choose(AVX2_EPYC, dtype="float16", environ={})


def test_flags_override_acts_out_another_cpu(monkeypatch):
    monkeypatch.setenv(machine.FLAGS_ENV, "avx2, fma")
    machine.cpu_info.cache_clear()
    try:
        info = machine.cpu_info()
        assert info.flags == {"avx2", "fma"} and not info.bf16_native
        assert info.describe()["avx512_bf16"] is False and info.describe()["amx"] is False
    finally:
        machine.cpu_info.cache_clear()


def test_bf16_warning_once_and_only_where_emulated(monkeypatch):
    warnings = []

    class Recorder:
        def warning(self, msg, *args):
            warnings.append(msg % args)

    monkeypatch.setattr(machine, "get_logger", lambda: Recorder())
    monkeypatch.setattr(machine, "_warned", False)
    monkeypatch.setattr(machine, "cpu_info", lambda: AVX2_EPYC)
    assert machine.warn_if_bf16_emulated(torch.float32) is False
    assert machine.warn_if_bf16_emulated(torch.bfloat16) is True
    assert machine.warn_if_bf16_emulated(torch.bfloat16) is False
    assert len(warnings) == 1 and "--dtype float32" in warnings[0] and AVX2_EPYC.model in warnings[0]
    monkeypatch.setattr(machine, "_warned", False)
    monkeypatch.setattr(machine, "cpu_info", lambda: AMX_XEON)
    assert machine.warn_if_bf16_emulated(torch.bfloat16) is False
    assert len(warnings) == 1
