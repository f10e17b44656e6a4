"""The embedded model: found in the installed package, converted once, loadable as plain bf16."""
import json

import pytest

from lcx_plugin.harness import model


def test_gguf_comes_from_the_installed_package():
    path = model.find_gguf()
    assert path is not None and path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_prepare_is_idempotent_and_yields_a_plain_bf16_llama():
    first = model.prepare()
    mark = (first / model.READY_MARK).stat().st_mtime
    assert model.prepare() == first
    assert (first / model.READY_MARK).stat().st_mtime == mark, "a ready model was converted again"
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)


def test_missing_conversion_dependencies_are_named(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(model.ModelPrepareError, match=r"needs \['gguf'\]"):
        model._convert(model.find_gguf(), tmp_path / "out")
