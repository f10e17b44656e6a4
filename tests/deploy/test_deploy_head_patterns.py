"""Head patterns from a ConfigMap: the head-patterns component mounts them, the head-split example's
lcx config points at a mounted file, and that file is a valid pattern for the served model."""
import json
import os
from pathlib import Path

from lcx_plugin import head_patterns
from lcx_plugin.config import LcxConfig
from lcx_plugin.head_patterns import ModelShape

EXAMPLE = "examples/head-split"
MOUNT = "/etc/lcx/patterns"


def _generated(objects, prefix):
    (obj,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix + "-")]
    return obj


def test_patterns_are_mounted_read_only_from_the_generated_configmap(render, select):
    objects = render(EXAMPLE)
    (dep,) = select(objects, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    vllm = next(c for c in pod["containers"] if c["name"] == "vllm")
    (mount,) = [m for m in vllm["volumeMounts"] if m["mountPath"] == MOUNT]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    patterns = _generated(objects, "lcx-head-patterns")
    assert volume["configMap"]["name"] == patterns["metadata"]["name"]  # the hashed name: a new pattern rolls the pods
    assert "--attention-backend" in vllm["args"]


def test_the_config_names_a_mounted_pattern_that_fits_the_model(render, tmp_path):
    objects = render(EXAMPLE)
    config = LcxConfig.from_dict(json.loads(_generated(objects, "lcx-config")["data"]["LCX_CONFIG"]))
    assert config.method == "head_split"
    path = Path(config.selector.pattern)
    assert str(path.parent) == MOUNT
    data = _generated(objects, "lcx-head-patterns")["data"]
    assert path.name in data, f"{path.name} is not a key of the mounted ConfigMap: {sorted(data)}"
    local = tmp_path / path.name  # the file as the pod sees it
    local.write_text(data[path.name])
    pattern = head_patterns.load(local)
    assert pattern.check(ModelShape(30, 3, 64)) == []
    shipped = head_patterns.shipped("SmolLM2-135M-Instruct")
    assert json.loads(data[path.name]) == json.loads(shipped.read_text()), "the example's copy went stale"
    assert os.path.basename(shipped) == path.name
