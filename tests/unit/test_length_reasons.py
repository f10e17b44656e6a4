"""The startup refusal past the trained length (``compat.length_reasons``), on the config fields it
reads: a method that cannot extrapolate, and an extrapolating one whose ``min_context`` would keep
contexts past the trained length dense. (The whole refusal in the real engine:
tests/engine/test_extrapolation.py.)"""
from types import SimpleNamespace

from lcx_plugin.attention_backends.vllm import compat
from lcx_plugin.config import LcxConfig


def _vllm_config(max_model_len: int, trained: int = 8192):
    model = SimpleNamespace(max_model_len=max_model_len, hf_overrides={}, model="/models/SmolLM2-135M-Instruct",
                            hf_text_config=SimpleNamespace(max_position_embeddings=trained))
    return SimpleNamespace(model_config=model, cache_config=SimpleNamespace(block_size=128))


def _reasons(lcx: dict, max_model_len: int) -> list[str]:
    return compat.length_reasons(LcxConfig.from_dict(lcx).selector, _vllm_config(max_model_len))


def test_within_the_trained_length_every_method_serves():
    assert _reasons({"method": "dense"}, 8192) == []
    assert _reasons({"method": "token_select"}, 4096) == []


def test_past_it_a_method_that_cannot_extrapolate_is_refused_and_told_which_can():
    (reason,) = _reasons({"method": "token_select"}, 16384)
    assert "past SmolLM2-135M-Instruct's trained length of 8192" in reason
    assert '"token_select", "prefill": "select", "extrapolate": true' in reason


def test_an_extrapolating_method_may_not_keep_long_contexts_dense():
    (reason,) = _reasons({"method": "token_select", "prefill": "select", "extrapolate": True, "min_context": 10000},
                         16384)
    assert "min_context 10000" in reason and "lower it to at most 8192" in reason
