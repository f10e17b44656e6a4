"""The container command in the manifests is a real, working `vllm serve` command line.

The command and args of the vllm container are taken from the rendered Deployment and run here,
on CPU, against the local model; then one completion is requested over HTTP. Only these
substitutions are made, each for a reason stated in SUBSTITUTIONS; every other argument, and
every env var the manifest sets, is used verbatim (--attention-backend lcx, --additional-config,
--served-model-name, LCX_CONFIG, ...).

Needs the project's vLLM environment (the `vllm` executable next to sys.executable) and a
local model directory in LCX_MODEL_DIR.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.server import free_ports, http_json, served_together

pytestmark = pytest.mark.slow

TARGETS = {  # render target -> Deployment name
    "base": "vllm",  # lcx through --additional-config
    "examples/existing-fleet": "chat-llm",  # lcx through the component (LCX_CONFIG, mounted ConfigMap)
}
STARTUP_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 120
CPU_MAX_MODEL_LEN = "2048"

SUBSTITUTIONS = """
- "vllm" (argv[0]) -> the vllm executable of this Python environment: the same program.
- the model (first positional argument of `vllm serve`) -> $LCX_MODEL_DIR: the pod reads it
  from a cluster volume.
- --host VALUE -> 127.0.0.1, --port VALUE -> a free port: tests listen on loopback only.
- --max-model-len VALUE -> 2048, and --enforce-eager added: a CPU-sized engine that starts
  in under a minute on 2 cores.
- every target's server starts at once, each worker bound to its own CPUs
  (VLLM_CPU_OMP_THREADS_BIND, ``server.spread_binds``): a pod has its node's CPUs to itself.
- GPU-only flags dropped with their value (GPU_ONLY_FLAGS): they mean nothing to the CPU engine.
- env VLLM_CPU_KVCACHE_SPACE=1 added: the CPU engine's KV-cache budget in GiB.
- paths under the pod's volume mounts (in env values and args) -> temporary directories;
  ConfigMap volumes are written there with the rendered ConfigMap's data, as the kubelet would.
- $(VAR) references are expanded from the container's env, as the kubelet does.
"""
GPU_ONLY_FLAGS = {"--gpu-memory-utilization", "--tensor-parallel-size", "--pipeline-parallel-size"}


def entrypoint(paths) -> list[str]:
    """ENTRYPOINT of the lcx image, used when a container sets no command (as the kubelet does)."""
    text = (paths.deploy / "docker/Dockerfile").read_text()
    (line,) = [l for l in text.splitlines() if l.startswith("ENTRYPOINT ")]
    return json.loads(line.split(" ", 1)[1])



def expand(value: str, env: dict[str, str]) -> str:
    # Kubernetes expands $(VAR) from earlier env entries, keeps unknown ones and unescapes $$.
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def container_env(c, objects) -> dict[str, str]:
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = config_maps[ref["name"]]["data"][ref["key"]]
        else:
            pytest.fail(f"env {e['name']}: this test does not know how to resolve {e}")
    return env


def local_mounts(pod, c, objects, root: Path) -> dict[str, Path]:
    """Pod mount path -> local directory standing in for it (ConfigMaps filled in)."""
    config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {}
    for m in c.get("volumeMounts", []):
        if m["mountPath"] == "/dev/shm":
            continue  # the host's own /dev/shm serves the same purpose here
        local = root / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        volume = volumes[m["name"]]
        if "configMap" in volume:
            for key, data in config_maps[volume["configMap"]["name"]]["data"].items():
                (local / key).write_text(data)
        mounts[m["mountPath"].rstrip("/")] = local
    return mounts


def remap(value: str, mounts: dict[str, Path]) -> str:
    """Rewrite pod paths under a mount to the local stand-in, in one pass (longest mount first)."""
    if not mounts:
        return value
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    return re.sub(rf"(?<![\w.-])({alternatives})(?=/|$|[^\w.-])",
                  lambda m: str(mounts[m.group(1)]), value)


def local_command(argv: list[str], vllm: Path, model_dir: str, port: int) -> list[str]:
    assert argv[:2] == ["vllm", "serve"], f"not a `vllm serve` command: {argv[:2]}"
    out = [str(vllm), "serve", model_dir]
    rest = argv[3:]  # argv[2] is the model
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in GPU_ONLY_FLAGS:
            i += 2
            continue
        if a in ("--host", "--port", "--max-model-len"):
            out += [a, {"--host": "127.0.0.1", "--port": str(port), "--max-model-len": CPU_MAX_MODEL_LEN}[a]]
            i += 2
            continue
        out.append(a)
        i += 1
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port)), ("--max-model-len", CPU_MAX_MODEL_LEN)):
        if flag not in out:
            out += [flag, value]
    return out + ["--enforce-eager"]


def _prepare(target: str, render, paths, root: Path, vllm: Path, model_dir: str, port: int) -> dict:
    """The target's container command made local (SUBSTITUTIONS), its env, and its served name."""
    objects = render(target)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == TARGETS[target]]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "vllm"]

    pod_env = container_env(c, objects)
    mounts = local_mounts(pod, c, objects, root / "volumes")
    # Pod paths are remapped before the local values (model dir, port) go in, so those stay as given.
    argv = [remap(expand(a, pod_env), mounts)
            for a in (c.get("command") or entrypoint(paths)) + c.get("args", [])]
    name = argv[argv.index("--served-model-name") + 1] if "--served-model-name" in argv else model_dir
    return {"command": local_command(argv, vllm, model_dir, port), "log": root / "server.log", "name": name,
            "env": {k: remap(v, mounts) for k, v in pod_env.items()}}


@pytest.fixture(scope="module")
def manifest_servers(render, paths, tmp_path_factory):
    """Every target's server, started together (their start-ups overlap: 2 cores, each start a
    chain of three processes importing vLLM): ``{target: (prepared, base url)}``."""
    vllm = Path(sys.executable).parent / "vllm"
    assert vllm.exists(), f"no vllm executable next to {sys.executable}: run the tests with ./lcx test"
    model_dir = str(prepare())  # the embedded model, converted once
    targets = sorted(TARGETS)
    prepared = [_prepare(t, render, paths, tmp_path_factory.mktemp(t.replace("/", "-")), vllm, model_dir, port)
                for t, port in zip(targets, free_ports(len(targets)))]
    servers = [(p["command"], p["log"], {**p["env"], "VLLM_CPU_KVCACHE_SPACE": "1"}) for p in prepared]
    with served_together(servers, startup_timeout=STARTUP_TIMEOUT_S, env=dict(os.environ)) as urls:
        yield dict(zip(targets, zip(prepared, urls)))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_manifest_command_serves_a_completion(target, manifest_servers):
    prepared, base_url = manifest_servers[target]
    name = prepared["name"]
    status, answer = http_json(base_url + "/v1/completions", {
        "model": name, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
    }, timeout=REQUEST_TIMEOUT_S)
    assert status == 200, answer
    assert answer["model"] == name
    assert len(answer["choices"]) == 1 and isinstance(answer["choices"][0]["text"], str)
    assert 1 <= answer["usage"]["completion_tokens"] <= 8
    served_log = prepared["log"].read_text(errors="replace")
    assert "Using LCX backend on CPU" in served_log and "lcx attention active" in served_log, served_log[-4000:]
