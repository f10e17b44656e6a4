"""Rendered objects validate offline against the Kubernetes OpenAPI schemas.

Built-in kinds go through kubernetes-validate (strict: unknown fields are errors) for a pinned
Kubernetes version. Custom resources (Gateway API, Prometheus Operator) have no schema in that
package and none is shipped here; their fields that matter are checked by hand in
test_deploy_crds.py. Any other kind makes the test fail, so nothing goes unchecked.
"""

import pytest

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is not installed: pip install -r tests/deploy/requirements.txt",
)

KUBERNETES_VERSION = "1.32.0"
CHECKED_BY_HAND = {  # kind -> apiVersion, see test_deploy_crds.py
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
}


def test_objects_match_kubernetes_schemas(render, kustomization_dir):
    for obj in render(kustomization_dir):
        where = f"{kustomization_dir.name}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CHECKED_BY_HAND:
            assert obj["apiVersion"] == CHECKED_BY_HAND[obj["kind"]], where
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{where}: no schema and no hand check for it ({e.message})")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{where} is invalid for Kubernetes {KUBERNETES_VERSION} at {path}: {e.message}")


def test_validator_rejects_a_broken_deployment(render):
    # Guard against a validator that accepts anything.
    deployment = next(o for o in render("base") if o["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
