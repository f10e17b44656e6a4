"""Security and hygiene policy for every rendered workload, and for image references anywhere.

- no privileged container, no privilege escalation (it must be switched off explicitly);
- pods run as non-root and share nothing with the host;
- every container sets CPU and memory requests and limits;
- every image is pinned: it has a tag or digest, and the tag is not "latest".
"""

import re

import yaml

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def pod_specs(objects):
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def containers(pod_spec):
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def image_problem(image: str) -> str | None:
    """Why an image reference is not pinned, or None if it is."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag"
    if last.rsplit(":", 1)[1] == "latest":
        return "uses the latest tag"
    return None


def test_image_rule_itself():
    assert image_problem("vllm/vllm-openai:v0.32.0") is None
    assert image_problem("registry:5000/a/b@sha256:" + "0" * 64) is None
    assert image_problem("registry:5000/a/b") == "has no tag"
    assert image_problem("vllm/vllm-openai:latest") == "uses the latest tag"


def test_workloads_follow_policy(render, kustomization_dir):
    problems = []
    for name, pod in pod_specs(render(kustomization_dir)):
        if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{name}: pod does not set runAsNonRoot: true")
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(host):
                problems.append(f"{name}: {host}")
        for c in containers(pod):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities not dropped")
            if sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: adds capabilities")
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(c.get("resources", {}).get(part, {}))
                if missing:
                    problems.append(f"{where}: resources.{part} lacks {sorted(missing)}")
            why = image_problem(c["image"])
            if why:
                problems.append(f"{where}: image {c['image']} {why}")
    assert not problems, "\n".join(problems)


def test_no_latest_tag_anywhere_in_deploy(paths):
    # Dockerfiles, docs and manifests alike.
    hits = []
    for f in sorted(paths.deploy.rglob("*")):
        if f.is_file():
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if re.search(r":latest\b", line):
                    hits.append(f"{f.relative_to(paths.repo)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)
