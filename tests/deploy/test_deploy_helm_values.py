"""deploy/helm/values-lcx.yaml carries the same lcx settings as the kustomize manifests.

The chart itself is not rendered here (no helm on the machine); these check the values file's
own consistency and that it agrees with the base and the component.
"""

import json

import pytest
import yaml

@pytest.fixture(scope="module")
def values(paths):
    return yaml.safe_load((paths.deploy / "helm/values-lcx.yaml").read_text())


@pytest.fixture(scope="module")
def arms(values):
    return {m["podLabels"]["lcx.ai/arm"]: m for m in values["servingEngineSpec"]["modelSpec"]}


def flag(args, name):
    return args[args.index(name) + 1] if name in args else None


def test_lcx_arm_flags_and_env(values, arms, paths, render, select):
    lcx = arms["lcx"]
    args = lcx["vllmConfig"]["extraArgs"]
    assert flag(args, "--attention-backend") == "lcx"
    additional = json.loads(flag(args, "--additional-config"))
    (base,) = select(render("base"), "Deployment")
    base_args = base["spec"]["template"]["spec"]["containers"][0]["args"]
    assert additional == json.loads(flag(base_args, "--additional-config")), "same lcx config as the base"

    extra = {(o["kind"], o["metadata"]["name"]): o for o in values["extraObjects"]}
    (lcx_env,) = [e for e in lcx["env"] if e["name"] == "LCX_CONFIG"]
    ref = lcx_env["valueFrom"]["configMapKeyRef"]
    env_config = json.loads(extra[("ConfigMap", ref["name"])]["data"][ref["key"]])
    component_config = json.loads((paths.kustomize / "components/lcx-patch/lcx-config.json").read_text())
    assert env_config == component_config == additional["lcx"]

    for volume in lcx["extraVolumes"]:
        assert ("ConfigMap", volume["configMap"]["name"]) in extra
    assert {m["name"] for m in lcx["extraVolumeMounts"]} == {v["name"] for v in lcx["extraVolumes"]}


def test_stock_arm_is_the_lcx_arm_without_lcx(arms):
    stock, lcx = arms["stock"], arms["lcx"]
    assert stock["repository"] == "vllm/vllm-openai"
    assert "--attention-backend" not in stock["vllmConfig"]["extraArgs"]
    assert flag(stock["vllmConfig"]["extraArgs"], "--served-model-name") == \
        flag(lcx["vllmConfig"]["extraArgs"], "--served-model-name")
    differ = {"name", "enabled", "repository", "tag", "podLabels", "vllmConfig", "env",
              "extraVolumes", "extraVolumeMounts"}
    assert {k: v for k, v in stock.items() if k not in differ} == \
           {k: v for k, v in lcx.items() if k not in differ}


def test_extra_objects_are_valid_kubernetes(values):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed: pip install -r tests/deploy/requirements.txt",
    )
    for obj in values["extraObjects"]:
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
