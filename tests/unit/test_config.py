"""The lcx config: defaults, both sources, the method's own validation, and one clear error for
every kind of bad input."""
import json

import pytest

from lcx_plugin.config import ENV_VAR, LcxConfig, LcxConfigError, resolve_config
from lcx_plugin.selectors import get


def test_no_config_serves_the_recommended_default():
    from lcx_plugin.config import is_default
    from lcx_plugin.recommended import RECOMMENDED, WITHOUT_PATTERN

    # The embedded model has a shipped head pattern: the head split with TokenSelect inside.
    cfg = resolve_config({}, environ={}, model="/models/SmolLM2-135M-Instruct")
    assert cfg == LcxConfig.from_dict(RECOMMENDED) and cfg.method == "head_split"
    assert cfg.selector.retrieval.name == "token_select" and cfg.selector.retrieval.min_context == 2048
    assert cfg.quantized and cfg.kv_format == "int8"  # vLLM: int8 pages under both kinds of heads
    # SGLang's pools hold the model's dtype: the same composition, unquantized.
    on_sglang = resolve_config({}, environ={}, model="/models/SmolLM2-135M-Instruct", engine="sglang")
    assert not on_sglang.quantized and on_sglang.selector == cfg.selector
    # Any other model: TokenSelect alone (a head split needs a pattern), never an error.
    other = resolve_config(None, environ={}, model="org/Unknown-7B")
    assert other == LcxConfig.from_dict(WITHOUT_PATTERN) and other.method == "token_select"
    assert resolve_config(None, environ={}) == other
    assert is_default({}, {}) and is_default(None, {"LCX_CONFIG": "  "})
    assert not is_default({"lcx": {}}, {}) and not is_default(None, {ENV_VAR: '{"method": "dense"}'})


def test_a_config_without_method_is_dense():
    cfg = resolve_config({"lcx": {}}, environ={})
    assert cfg == LcxConfig() and cfg.method == "dense" and cfg.kernel == "auto"
    assert cfg.to_dict() == {"method": "dense", "kernel": "auto"}
    assert resolve_config({}, environ={ENV_VAR: '{"method": "dense"}'}, model="SmolLM2-135M-Instruct") == LcxConfig()


def test_method_parameters_are_validated_and_defaulted():
    cfg = LcxConfig.from_dict({"method": "streaming", "window": 256})
    assert cfg.selector == get("streaming")(sink=64, window=256, min_context=0)
    assert cfg.to_dict() == {"method": "streaming", "kernel": "auto", "sink": 64, "window": 256, "min_context": 0,
                             "extrapolate": False}
    assert LcxConfig.from_dict(cfg.to_dict()) == cfg  # round trip


def test_additional_config_and_env_inline_and_file(tmp_path):
    assert resolve_config({"lcx": {"kernel": "torch"}}, environ={}).kernel == "torch"
    assert resolve_config(None, environ={ENV_VAR: '{"kernel": "triton"}'}).kernel == "triton"
    f = tmp_path / "lcx.json"
    f.write_text(json.dumps({"method": "streaming", "sink": 4, "kernel": "engine"}))
    cfg = resolve_config(None, environ={ENV_VAR: str(f)})
    assert (cfg.kernel, cfg.method, cfg.selector.sink) == ("engine", "streaming", 4)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lcx": {"bogus": 1}}, r"unknown key\(s\) \['bogus'\] for method 'dense'; valid keys are \['kernel', 'kv_format', 'kv_group_size', 'kv_high_fraction', 'method'\]"),
        ({"lcx": {"method": "streaming", "windw": 3}},
         r"unknown key\(s\) \['windw'\] for method 'streaming'; valid keys are \['extrapolate', 'kernel', 'kv_format', 'kv_group_size', 'kv_high_fraction', 'method', 'min_context', 'sink', 'window'\]"),
        ({"lcx": {"method": "magic"}}, r"method='magic' is not one of \['dense', 'head_split', 'hip', 'streaming'"),
        ({"lcx": {"method": 3}}, r"method=3 must be a string"),
        ({"lcx": {"kernel": 3}}, r"kernel=3 must be a string"),
        ({"lcx": {"kernel": "cuda"}}, r"kernel='cuda' is not one of"),
        ({"lcx": ["dense"]}, r"must be a JSON object such as"),
        ({"lcx": None}, r"must be a JSON object such as .*, got null"),
        ({"lcx": {"method": "streaming", "window": "big"}}, r"window='big' must be int"),
        ({"lcx": {"method": "streaming", "window": True}}, r"window=True must be int"),
        ({"lcx": {"method": "streaming", "window": 2.5}}, r"window=2.5 must be int"),
        ({"lcx": {"method": "streaming", "window": 0}}, r"window=0 must be >= 1"),
        ({"lcx": {"method": "streaming", "sink": -1}}, r"sink=-1 must be >= 0"),
        ({"lcx": {"method": "streaming", "min_context": -5}}, r"min_context=-5 must be >= 0"),
        ({"lcx": {"kv_format": "int3"}}, r"from --additional-config: kv_format='int3' is not one of \['auto', 'int8', 'int4', 'mixed'\]"),
        ({"lcx": {"kv_format": 4}}, r"kv_format=4 must be a string"),
        ({"lcx": {"kv_format": "int4", "kv_group_size": 0}}, r"kv_group_size=0 must be an integer in \[1, 1024\] or null"),
        ({"lcx": {"kv_format": "int4", "kv_group_size": "64"}}, r"kv_group_size='64' must be an integer"),
        ({"lcx": {"kv_format": "int4", "kv_group_size": True}}, r"kv_group_size=True must be an integer"),
        ({"lcx": {"kv_group_size": 32}}, r"kv_group_size applies to quantized pages"),
        ({"lcx": {"kv_format": "int8", "kernel": "engine"}}, r"kernel='engine' is vLLM's CPU op, which cannot read int8"),
        ({"lcx": {"kv_format": "mixed", "kernel": "engine"}}, r"kernel='engine' is vLLM's CPU op, which cannot read mixed"),
        ({"lcx": {"kv_format": "mixed", "kv_high_fraction": 0}}, r"kv_high_fraction=0 must be a number in \(0, 0.5\]"),
        ({"lcx": {"kv_format": "mixed", "kv_high_fraction": 0.75}}, r"kv_high_fraction=0.75 must be a number"),
        ({"lcx": {"kv_format": "mixed", "kv_high_fraction": "0.1"}}, r"kv_high_fraction='0.1' must be a number"),
        ({"lcx": {"kv_format": "mixed", "kv_high_fraction": True}}, r"kv_high_fraction=True must be a number"),
        ({"lcx": {"kv_format": "int4", "kv_high_fraction": 0.1}}, r"kv_high_fraction applies to mixed-precision pages"),
    ],
)
def test_bad_values_name_the_problem(raw, message):
    with pytest.raises(LcxConfigError, match=message):
        resolve_config(raw, environ={})


def test_env_errors(tmp_path):
    with pytest.raises(LcxConfigError, match="neither inline JSON nor an existing file"):
        resolve_config(None, environ={ENV_VAR: str(tmp_path / "missing.json")})
    with pytest.raises(LcxConfigError, match="not valid JSON"):
        resolve_config(None, environ={ENV_VAR: "{not json"})
    with pytest.raises(LcxConfigError, match="got null"):
        resolve_config(None, environ={ENV_VAR: "null"})
    null_file = tmp_path / "null.json"
    null_file.write_text("null")
    with pytest.raises(LcxConfigError, match="got null"):
        resolve_config(None, environ={ENV_VAR: str(null_file)})
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LcxConfigError, match="not UTF-8"):
        resolve_config(None, environ={ENV_VAR: str(binary)})
    huge = tmp_path / "huge.json"
    huge.write_text("{" + " " * (2 << 20) + "}")
    with pytest.raises(LcxConfigError, match="a config is at most"):
        resolve_config(None, environ={ENV_VAR: str(huge)})


def test_two_sources_that_disagree_are_refused():
    with pytest.raises(LcxConfigError, match="given twice and they differ"):
        resolve_config({"lcx": {"kernel": "torch"}}, environ={ENV_VAR: '{"kernel": "engine"}'})
    with pytest.raises(LcxConfigError, match="given twice and they differ"):
        resolve_config({"lcx": {"method": "streaming"}}, environ={ENV_VAR: '{"method": "streaming", "window": 8}'})
    same = resolve_config({"lcx": {"kernel": "torch"}}, environ={ENV_VAR: '{"kernel": "torch"}'})
    assert same.kernel == "torch"


def test_mixed_format_parses_with_its_default_fraction_and_round_trips():
    cfg = resolve_config({"lcx": {"method": "dense", "kv_format": "mixed"}}, environ={})
    assert (cfg.quantized, cfg.mixed, cfg.high_fraction) == (True, True, 0.125)
    assert cfg == resolve_config({"lcx": {"kv_format": "mixed", "kv_high_fraction": 0.125}}, environ={})
    assert resolve_config({"lcx": cfg.to_dict()}, environ={}) == cfg
    assert resolve_config({}, environ={ENV_VAR: '{"kv_format": "mixed", "kv_high_fraction": 0.25}'}).high_fraction == 0.25


def test_quantized_formats_parse_and_round_trip():
    cfg = resolve_config({"lcx": {"method": "streaming", "kv_format": "int4", "kv_group_size": 32}}, environ={})
    assert (cfg.quantized, cfg.kv_bits, cfg.group_size(64), cfg.group_size(16)) == (True, 4, 32, 16)
    assert resolve_config({"lcx": cfg.to_dict()}, environ={}) == cfg
    plain = resolve_config({"lcx": {"method": "dense"}}, environ={})
    assert not plain.quantized and "kv_format" not in plain.to_dict()


def test_cli_lists_the_engine_keys_with_the_methods(capsys):
    from lcx_plugin.cli import main

    assert main(["config", "--methods"]) == 0
    out = capsys.readouterr().out
    assert "token_select:" in out and "kv_format='auto' (one of ['auto', 'int8', 'int4', 'mixed'])" in out, out


def test_extrapolate_only_where_the_method_selects_at_every_row():
    assert LcxConfig.from_dict({"method": "streaming", "extrapolate": True}).selector.extrapolate
    assert LcxConfig.from_dict({"method": "hip", "dense_layers": [], "extrapolate": True}).selector.extrapolate
    assert LcxConfig.from_dict({"method": "token_select", "prefill": "select", "extrapolate": True}).selector.extrapolate
    for bad, why in (({"method": "token_select", "extrapolate": True}, "only with prefill 'select'"),
                     ({"method": "token_select", "prefill": "select", "granularity": "page", "extrapolate": True},
                      "granularity 'token' only"),
                     ({"method": "token_select", "prefill": "whole"}, "prefill='whole' must be one of"),
                     ({"method": "token_select", "query_block": 40}, "multiple of 16"),
                     ({"method": "head_split", "extrapolate": True}, "retrieval heads attend densely"),
                     ({"method": "hip", "extrapolate": True}, "dense_layers"),
                     ({"method": "streaming", "extrapolate": 1}, "must be bool"),
                     ({"method": "dense", "extrapolate": True}, "unknown key")):
        with pytest.raises(LcxConfigError, match=why):
            LcxConfig.from_dict(bad)
