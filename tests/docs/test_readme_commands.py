"""Every command in a fenced shell block of every README runs as written, wherever it can run here.

Each command is matched to one way of checking it (``CHECKS``): run as written; run as written with
a flag that stops before the long work (``--dry-run``, ``--help``, ``--collect-only``) where the full
run takes minutes (the full runs are measured in bench/results/runtime.json); render instead of
apply where the command needs a Kubernetes cluster; or, for the few that need what no machine of
this kind has (a Docker engine, a cluster), a stated reason. A command no check matches fails the
test, so a new README command cannot go untested.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READMES = ["README.md", "deploy/README.md", "envs/README.md", "docs/adding-a-method.md"]
LCX = str(REPO / "lcx")


def _commands() -> list[tuple[str, str]]:
    """(file:line, command) for every command line of every fenced shell block (continuations joined,
    comments dropped)."""
    found = []
    for name in READMES:
        lines = (REPO / name).read_text().splitlines()
        in_block = False
        pending, start = "", 0
        for n, line in enumerate(lines, 1):
            if line.startswith("```"):
                in_block = line.strip() in ("```bash", "```sh", "```shell") and not in_block
                continue
            if not in_block:
                continue
            text = line.split("  #")[0].rstrip() if not line.lstrip().startswith("#") else ""
            if not text and not pending:
                continue
            if not pending:
                start = n
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            found.append((f"{name}:{start}", " ".join((pending + text).split())))
            pending = ""
    return found


COMMANDS = _commands()


def _run(cmd: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _ok(cmd: str, **kw) -> str:
    proc = _run(cmd, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def check_as_written(cmd: str) -> None:
    _ok(cmd)


def check_lcx_ab(cmd: str) -> None:
    out = _ok(cmd + " --dry-run")
    assert "dry run:" in out, out


def check_demo(cmd: str) -> None:
    out = _ok(cmd + " --dry-run")
    assert "dry run:" in out and "dtype=" in out, out


def check_test_command(cmd: str, request: pytest.FixtureRequest) -> None:
    """The command collects the whole suite (more than 100 tests). When this session is that
    command itself, run over the whole suite (``.ci/run`` calls it; the script marks its pytest runs
    with ``LCX_TEST_COMMAND``), this session's own collection shows it: collecting again through the
    command cost about 30 s. Otherwise (pytest run directly, or ``./lcx test`` over a few named
    tests) the command runs as written, with ``--collect-only`` (both environments)."""
    if os.environ.get("LCX_TEST_COMMAND") == "1" and request.session.testscollected > 100:
        return
    out = _ok(cmd + " --collect-only -q", timeout=900)
    m = re.search(r"(\d+) tests? collected", out)
    assert m and int(m.group(1)) > 100, out[-2000:]


def check_bench(cmd: str) -> None:
    out = _ok(cmd + " --help")
    assert "usage:" in out


def check_serve_metrics(cmd: str) -> None:
    """As ``check_serve``; then the server's /metrics carries lcx's series."""
    check_serve(cmd, metrics=True)


def check_serve(cmd: str, metrics: bool = False) -> None:
    """Start the server exactly as written (it listens on vLLM's default port 8000), ask it for a
    completion, stop it."""
    import socket

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000 is taken on this machine; the README command uses vLLM's default port")
    log = open(REPO / "out" / "readme_serve.log", "w") if (REPO / "out").is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited with {proc.returncode}"
            try:
                with urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=5) as r:
                    model = __import__("json").loads(r.read())["data"][0]["id"]
                break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("the server did not come up in 300 s")
        req = urllib.request.Request("http://127.0.0.1:8000/v1/completions", headers={"Content-Type": "application/json"},
                                     data=__import__("json").dumps({"model": model, "prompt": "The capital of France is",
                                                                    "max_tokens": 4}).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
        if metrics:
            with urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=30) as r:
                text = r.read().decode()
            assert "lcx_kv_tokens_held_total{" in text and "lcx_config_info{" in text, text[-2000:]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def check_wheel(cmd: str, tmp_path: Path) -> None:
    """Build the wheel as written, in a copy of the tree (so dist/ lands there, not in the checkout)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    subprocess.run(f"git ls-files -z | xargs -0 cp --parents -t {copy}", shell=True, cwd=REPO, check=True)
    proc = subprocess.run(["bash", "-c", cmd], cwd=copy, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((copy / "dist").glob("lcx-*.whl"))


def check_kubectl_render(cmd: str, tmp_path: Path) -> None:
    """Commands against a cluster: render the same kustomization here (what `apply`/`diff` would send)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH")
    example = REPO / "deploy/kustomize/examples/existing-fleet"
    out = _ok(f"kubectl kustomize {example}")
    assert "attention-backend" in out


def check_calibrate(cmd: str, tmp_path: Path) -> None:
    """As written, on one short prompt with a window to match (the full run takes minutes; the
    ablation's 181 forward passes took 77 s at 512 tokens, 43 s at 256; 208 is the shortest
    passkey prompt), into a temporary file."""
    from lcx_plugin import head_patterns

    out = tmp_path / "pattern.json"
    _ok(f"{cmd} --prompts 1 --length 208 --sink 16 --window 64 --steps 2 --out {out}", timeout=900)
    pattern = head_patterns.load(out)
    assert pattern.model is not None and pattern.scores.shape[0] == pattern.model.num_layers


def needs(reason: str):
    def check(cmd: str) -> None:
        pytest.skip(f"not runnable on this machine kind: {reason}")
    return check


CHECKS = [
    (r"^\./lcx demo\b", check_demo),
    (r"^\./lcx test\b", check_test_command),
    (r"^\./lcx bench\b", check_bench),
    (r"^\./lcx vllm serve\b", check_serve),
    (r"^env PROMETHEUS_MULTIPROC_DIR=.+? \./lcx vllm serve\b", check_serve_metrics),
    (r"^(\./)?lcx ab\b", check_lcx_ab),
    (r"^\./lcx (config|machine|model)\b", check_as_written),
    (r"^\./lcx calibrate\b", check_calibrate),
    (r"^envs/setup\.sh \w+$", check_as_written),
    (r"^python -m pip wheel --no-deps -w dist \.$", check_wheel),
    (r"^pip install pytest -r tests/deploy/requirements\.txt$", needs("installs into the current environment; "
                                                                     "the project env already has these pins")),
    (r"^python -m pytest tests/deploy -m \"not slow\"$", check_as_written),
    (r"^kubectl (kustomize \.|diff -k \.|apply -k \.)", check_kubectl_render),
    (r"^kubectl (rollout|logs|port-forward|delete|get)\b", needs("a Kubernetes cluster")),
    (r"^docker (build|push)\b", needs("a Docker engine (only the client is installed)")),
]


def _check_for(cmd: str):
    for pattern, check in CHECKS:
        if re.search(pattern, cmd):
            return check
    return None


def test_every_readme_command_has_a_check():
    unknown = [f"{where}: {cmd}" for where, cmd in COMMANDS if _check_for(cmd) is None]
    assert not unknown, "README commands with no way to check them (add one to CHECKS):\n" + "\n".join(unknown)
    assert len(COMMANDS) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("where, cmd", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_readme_command_runs(where, cmd, tmp_path, request):
    check = _check_for(cmd)
    if check is None:
        pytest.fail(f"no check for {cmd!r}")
    fixtures = {"tmp_path": tmp_path, "request": request}  # passed to a check that names them
    names = check.__code__.co_varnames[: check.__code__.co_argcount]
    check(cmd, **{name: value for name, value in fixtures.items() if name in names})
