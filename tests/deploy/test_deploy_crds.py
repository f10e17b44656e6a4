"""Hand-written checks of the custom resources in the A/B overlay, and of what they point at.

No CRD schema is shipped with the repo, so these check the fields that decide whether the
split and the scrape work: weights, backend names and ports, and label selectors.
"""

import re

import pytest

AB = "overlays/ab"
ARM_LABEL = "lcx.ai/arm"
MAX_WEIGHT = 1_000_000  # Gateway API bound on backendRef.weight


@pytest.fixture(scope="module")
def ab(render):
    return render(AB)


def pod_labels(deployment):
    return deployment["spec"]["template"]["metadata"]["labels"]


def selected_deployments(objects, selector: dict):
    return [d for d in objects if d["kind"] == "Deployment"
            and selector.items() <= pod_labels(d).items()]


def test_deployment_selectors_match_their_pods(ab):
    for d in (o for o in ab if o["kind"] == "Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= pod_labels(d).items(), d["metadata"]["name"]


def test_each_service_selects_exactly_one_arm(ab, select):
    arms = []
    for svc in select(ab, "Service"):
        matched = selected_deployments(ab, svc["spec"]["selector"])
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {len(matched)} Deployments"
        arms.append(pod_labels(matched[0])[ARM_LABEL])
    assert sorted(arms) == ["lcx", "stock"]


def test_httproute_splits_between_the_two_arms(ab, select):
    (route,) = select(ab, "HTTPRoute")
    assert route["spec"]["parentRefs"], "an HTTPRoute needs a parent Gateway"
    services = {s["metadata"]["name"]: s for s in select(ab, "Service")}
    opt_out, rule = route["spec"]["rules"]
    # Per request: "x-lcx: off" goes to the stock arm, whatever the weights.
    (match,) = opt_out["matches"]
    assert match["headers"] == [{"type": "Exact", "name": "x-lcx", "value": "off"}]
    assert match["path"] == rule["matches"][0]["path"]
    (ref,) = opt_out["backendRefs"]
    (deployment,) = selected_deployments(ab, services[ref["name"]]["spec"]["selector"])
    assert pod_labels(deployment)[ARM_LABEL] == "stock"
    arms = {}
    for ref in rule["backendRefs"]:
        assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
        assert ref["name"] in services, f"backendRef {ref['name']} names no Service in the overlay"
        svc = services[ref["name"]]
        assert ref["port"] in [p["port"] for p in svc["spec"]["ports"]], ref
        assert isinstance(ref["weight"], int) and 0 <= ref["weight"] <= MAX_WEIGHT, ref
        (deployment,) = selected_deployments(ab, svc["spec"]["selector"])
        arms[pod_labels(deployment)[ARM_LABEL]] = ref["weight"]
    assert set(arms) == {"stock", "lcx"}
    assert sum(arms.values()) > 0
    assert arms["lcx"] > 0, "the lcx arm must get some traffic"


def test_arms_differ_only_in_image_and_lcx_flags(ab, select):
    (stock,) = select(ab, "Deployment", "vllm-stock")
    (lcx,) = select(ab, "Deployment", "vllm-lcx")
    s, l = stock["spec"]["template"]["spec"], lcx["spec"]["template"]["spec"]
    cs, cl = s["containers"][0], l["containers"][0]
    assert cs["image"].startswith("vllm/vllm-openai:") and cl["image"] != cs["image"]
    lcx_flags = cl["args"][len(cs["args"]):]
    assert cl["args"][:len(cs["args"])] == cs["args"]
    assert lcx_flags[:2] == ["--attention-backend", "lcx"] and lcx_flags[2] == "--additional-config"
    assert "--attention-backend" not in cs["args"]
    same = lambda c: {k: v for k, v in c.items() if k not in ("image", "args")}  # noqa: E731
    assert same(cs) == same(cl)
    assert {k: v for k, v in s.items() if k != "containers"} == {k: v for k, v in l.items() if k != "containers"}
    assert stock["spec"]["replicas"] == lcx["spec"]["replicas"]


def test_both_arms_serve_the_same_model_name(ab, select):
    names = set()
    for d in select(ab, "Deployment"):
        c = d["spec"]["template"]["spec"]["containers"][0]
        i = c["args"].index("--served-model-name")
        names.add((c["args"][i + 1], tuple(sorted((e["name"], e.get("value")) for e in c["env"]))))
    assert len(names) == 1, "clients must not be able to tell the arms apart by model name"


def test_podmonitor_scrapes_both_arms_and_keeps_the_arm(ab, select):
    (pm,) = select(ab, "PodMonitor")
    matched = selected_deployments(ab, pm["spec"]["selector"]["matchLabels"])
    assert sorted(pod_labels(d)[ARM_LABEL] for d in matched) == ["lcx", "stock"]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for d in matched:
        ports = [p for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        assert endpoint["port"] in [p.get("name") for p in ports], d["metadata"]["name"]
    # Prometheus exposes pod label "lcx.ai/arm" as __meta_kubernetes_pod_label_lcx_ai_arm.
    meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", ARM_LABEL)
    assert any(meta in r.get("sourceLabels", []) and r.get("targetLabel") for r in endpoint["relabelings"])


def test_engine_listens_and_is_probed_on_8000(render, select):
    for target in ("base", AB):
        for d in select(render(target), "Deployment"):
            c = d["spec"]["template"]["spec"]["containers"][0]
            assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
            assert c["args"][c["args"].index("--port") + 1] == "8000"
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/health", "port": 8000}, probe
