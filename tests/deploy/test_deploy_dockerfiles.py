"""The Dockerfiles build on pinned vLLM 0.32.0 images and add lcx with --no-deps only.

Docker cannot run on this machine, so the images are not built here; this reads the files.
"""

import re

import pytest

VLLM_VERSION = "0.32.0"
BASES = {
    "Dockerfile": "vllm/vllm-openai:v" + VLLM_VERSION,
    "Dockerfile.cpu": "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v" + VLLM_VERSION,
}


def instructions(text):
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [l.strip() for l in joined.splitlines() if l.strip()]


@pytest.mark.parametrize("name", sorted(BASES))
def test_dockerfile(paths, name):
    lines = instructions((paths.deploy / "docker" / name).read_text())
    args = dict(re.match(r"ARG (\w+)=(\S+)", l).groups() for l in lines if re.match(r"ARG \w+=", l))
    (from_line,) = [l for l in lines if l.startswith("FROM ")]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], from_line.split()[1])
    assert image == BASES[name]

    installs = [l for l in lines if "install" in l and l.startswith("RUN ")]
    assert installs, "lcx must be installed"
    for pip in re.findall(r"(?:pip install)[^;&]*", " ".join(installs)):
        assert "--no-deps" in pip and "lcx-" in pip, pip
    assert lines[-1] == 'ENTRYPOINT ["vllm", "serve"]'


def test_stock_arm_runs_the_vllm_the_image_builds_on(render, select):
    (stock,) = select(render("overlays/ab"), "Deployment", "vllm-stock")
    assert stock["spec"]["template"]["spec"]["containers"][0]["image"] == BASES["Dockerfile"]
