"""Every kustomization under deploy/kustomize renders with `kubectl kustomize`."""

EXPECTED_TARGETS = {"base", "overlays/ab", "examples/existing-fleet", "examples/existing-fleet/fleet", "examples/head-split"}


def test_render_targets_are_the_expected_ones(paths):
    found = {str(p.relative_to(paths.kustomize)) for p in paths.kustomizations}
    assert EXPECTED_TARGETS <= found, f"missing render targets: {EXPECTED_TARGETS - found}"


def test_renders(render, kustomization_dir):
    objects = render(kustomization_dir)
    assert objects, f"{kustomization_dir} rendered nothing"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
    assert any(o["kind"] == "Deployment" for o in objects), "every target deploys an engine"
