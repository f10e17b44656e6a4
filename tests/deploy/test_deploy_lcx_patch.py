"""The lcx-patch component, applied to the sample existing fleet, changes exactly what it says.

The fleet is rendered alone (examples/existing-fleet/fleet) and with the component
(examples/existing-fleet). Each expected change is checked and then undone on a copy; what is
left must equal the original Deployment, field for field.
"""

import copy
import json
import os
import subprocess

import pytest
import yaml

FLEET = "examples/existing-fleet/fleet"
PATCHED = "examples/existing-fleet"
LCX_IMAGE = "registry.example.com/lcx/vllm-openai-lcx:0.1.0-vllm0.32.0"


def container(deployment, name="vllm"):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def generated(objects, kind, prefix):
    """The one generated object whose name is prefix + '-' + hash."""
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix + "-")]
    return obj


def test_patch_changes_exactly_the_lcx_fields(render, select):
    (original,) = select(render(FLEET), "Deployment", "chat-llm")
    patched_objects = render(PATCHED)
    (patched,) = select(patched_objects, "Deployment", "chat-llm")
    undone = copy.deepcopy(patched)
    pod = undone["spec"]["template"]
    c = container(undone)

    # 1. image
    assert c["image"] == LCX_IMAGE
    c["image"] = container(original)["image"]

    # 2. --attention-backend lcx appended; the fleet's own args stay in order
    assert c["args"][-2:] == ["--attention-backend", "lcx"]
    del c["args"][-2:]

    # 3. LCX_CONFIG from the generated ConfigMap, holding a JSON object
    lcx_env = [e for e in c["env"] if e["name"] == "LCX_CONFIG"]
    assert len(lcx_env) == 1
    ref = lcx_env[0]["valueFrom"]["configMapKeyRef"]
    config_map = generated(patched_objects, "ConfigMap", "lcx-config")
    assert ref["name"] == config_map["metadata"]["name"]
    assert isinstance(json.loads(config_map["data"][ref["key"]]), dict)
    c["env"].remove(lcx_env[0])

    # 4. the arm label on the pods (not on the selector, which is immutable)
    assert pod["metadata"]["labels"].pop("lcx.ai/arm") == "lcx"
    assert undone["spec"]["selector"] == original["spec"]["selector"]

    assert undone == original


def test_patch_leaves_other_objects_alone(render, select):
    original, patched = render(FLEET), render(PATCHED)
    assert select(patched, "Service") == select(original, "Service")
    extra = {o["metadata"]["name"].rsplit("-", 1)[0] for o in patched if o not in original
             and o["kind"] != "Deployment"}
    assert extra == {"lcx-config"}


def test_patch_skips_deployments_that_are_ab_arms(render, select, paths, tmp_path, kubectl):
    # Applied over the A/B overlay, the component must not touch either arm: both carry
    # lcx.ai/arm, and the stock arm has to stay stock.
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731 (kustomize refuses absolute paths)
    (tmp_path / "kustomization.yaml").write_text(
        "resources:\n"
        f"  - {rel(paths.kustomize / 'overlays/ab')}\n"
        "components:\n"
        f"  - {rel(paths.kustomize / 'components/lcx-patch')}\n"
    )
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with_component = [o for o in yaml.safe_load_all(out.stdout) if o]
    assert select(with_component, "Deployment") == select(render("overlays/ab"), "Deployment")


def _break_container_name(deployment):
    deployment["spec"]["template"]["spec"]["containers"][0]["name"] = "engine"


def _drop_args(deployment):
    del deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("breakage", [_break_container_name, _drop_args], ids=["not-named-vllm", "no-args"])
def test_unmet_requirement_fails_the_render(breakage, render, select, paths, tmp_path, kubectl):
    # The component's documented requirements: a container "vllm" first, engine flags in args.
    # Unmet, the render must fail rather than produce a half-patched Deployment.
    (deployment,) = select(render(FLEET), "Deployment", "chat-llm")
    deployment = copy.deepcopy(deployment)
    breakage(deployment)
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet/deployment.yaml").write_text(yaml.safe_dump(deployment))
    (tmp_path / "fleet/kustomization.yaml").write_text("resources: [deployment.yaml]\n")
    component = os.path.relpath(paths.kustomize / "components/lcx-patch", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [fleet]\ncomponents: [{component}]\n")
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, "the component rendered a Deployment that breaks its requirements"
