"""The lcx config: defaults, both sources, and one clear error for every kind of bad input."""
import json

import pytest

from lcx_plugin.config import ENV_VAR, LcxConfig, LcxConfigError, resolve_config


def test_default_is_dense():
    assert resolve_config({}, environ={}) == LcxConfig(method="dense", kernel="auto")


def test_additional_config_and_env_inline_and_file(tmp_path):
    assert resolve_config({"lcx": {"kernel": "torch"}}, environ={}).kernel == "torch"
    assert resolve_config(None, environ={ENV_VAR: '{"kernel": "triton"}'}).kernel == "triton"
    f = tmp_path / "lcx.json"
    f.write_text(json.dumps({"method": "dense", "kernel": "engine"}))
    assert resolve_config(None, environ={ENV_VAR: str(f)}).kernel == "engine"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lcx": {"bogus": 1}}, r"unknown key\(s\) \['bogus'\]"),
        ({"lcx": {"method": "magic"}}, r"method='magic' is not one of"),
        ({"lcx": {"kernel": 3}}, r"kernel=3 must be a str"),
        ({"lcx": ["dense"]}, r"must be a JSON object"),
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


def test_two_sources_that_disagree_are_refused():
    with pytest.raises(LcxConfigError, match="given twice and they differ"):
        resolve_config({"lcx": {"kernel": "torch"}}, environ={ENV_VAR: '{"kernel": "engine"}'})
    same = resolve_config({"lcx": {"kernel": "torch"}}, environ={ENV_VAR: '{"kernel": "torch"}'})
    assert same.kernel == "torch"
