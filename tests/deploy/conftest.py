"""Shared fixtures for the deploy tests: where the manifests are, and rendering them.

Every directory under deploy/kustomize holding a kustomization.yaml of kind Kustomization is
a render target; Components are rendered through the kustomizations that use them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"


def _kustomizations() -> list[Path]:
    found = []
    for k in sorted(KUSTOMIZE.rglob("kustomization.yaml")):
        if yaml.safe_load(k.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(k.parent)
    return found


KUSTOMIZATIONS = _kustomizations()


def pytest_generate_tests(metafunc):
    # Any test asking for `kustomization_dir` runs once per render target.
    if "kustomization_dir" in metafunc.fixturenames:
        metafunc.parametrize(
            "kustomization_dir",
            KUSTOMIZATIONS,
            ids=[str(p.relative_to(KUSTOMIZE)) for p in KUSTOMIZATIONS],
        )


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with built-in kustomize v5) is not on PATH; it renders the manifests")
    return path


@pytest.fixture(scope="session")
def render(kubectl):
    """render(dir) -> list of the objects `kubectl kustomize dir` prints (cached per dir)."""
    cache: dict[Path, list[dict]] = {}

    def _render(directory: Path | str) -> list[dict]:
        directory = Path(directory)
        if not directory.is_absolute():
            directory = KUSTOMIZE / directory
        if directory not in cache:
            done = subprocess.run(
                [kubectl, "kustomize", str(directory)],
                capture_output=True, text=True, timeout=60,
            )
            assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
            cache[directory] = [d for d in yaml.safe_load_all(done.stdout) if d]
        return cache[directory]

    return _render


@pytest.fixture(scope="session")
def all_rendered(render) -> dict[str, list[dict]]:
    return {str(d.relative_to(KUSTOMIZE)): render(d) for d in KUSTOMIZATIONS}


def pick(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    """The objects of one kind (and name, if given) from a render."""
    return [o for o in objects
            if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


@pytest.fixture(scope="session")
def select():
    return pick


@pytest.fixture(scope="session")
def paths():
    """Repository locations, for tests that read files beside the manifests."""
    class Paths:
        repo = REPO
        deploy = DEPLOY
        kustomize = KUSTOMIZE
        kustomizations = tuple(KUSTOMIZATIONS)
    return Paths
