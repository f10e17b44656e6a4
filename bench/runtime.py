"""How long the README's two commands take on this machine, from a fresh clone, set-up included.

    python bench/runtime.py [--skip-demo] [--skip-ci]     # appends a run to bench/results/runtime.json

Clones the current HEAD into a temporary directory with empty environment and model caches, then
times ``./lcx demo`` and ``.ci/run`` there, each from an empty cache (so each includes building the
pinned environment and converting the model, as on a new machine). The record carries the machine
line and the settings lcx chose.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - t0, rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench/results/runtime.json"))
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-ci", action="store_true")
    args = ap.parse_args()
    from lcx_plugin.harness.settings import choose, machine_record

    settings = choose()
    machine = machine_record(settings)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    run = {"machine": {k: machine[k] for k in ("cpu", "cores", "avx2", "avx512f", "avx512_bf16", "amx")},
           "settings": {"bind": settings.bind, "dtype": settings.dtype}, "vllm": machine.get("vllm"), "commit": head}
    with tempfile.TemporaryDirectory(prefix="lcx-runtime-") as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        for what, cmd in (("demo", ["./lcx", "demo"]), ("ci", [".ci/run"])):
            if getattr(args, f"skip_{what}"):
                continue
            clone = Path(tmp) / f"clone-{what}"
            subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
            (clone.parent / "shared").exists() or os.symlink(REPO.parent / "shared", clone.parent / "shared")
            env = {**os.environ, "LCX_ENV_ROOT": str(Path(tmp) / f"envs-{what}"),
                   "LCX_CACHE_DIR": str(Path(tmp) / f"cache-{what}")}
            env.pop("LCX_MODEL_DIR", None)
            print(f"timing {' '.join(cmd)} in a fresh clone (log {logs / what}.log) ...", flush=True)
            seconds, rc = _timed(cmd, clone, env, logs / f"{what}.log")
            run[f"{what}_s"] = round(seconds)
            run[f"{what}_rc"] = rc
            print(f"  {what}: {seconds:.0f} s, exit {rc}", flush=True)
            if rc:
                print((logs / f"{what}.log").read_text()[-3000:])
            elif what == "demo":  # the demo's report, made by this commit on this machine, lands in the repo
                for f in (clone / "bench/results").glob("ab_default*"):
                    shutil.copy2(f, REPO / "bench/results" / f.name)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    data["runs"].append(run)
    out.write_text(json.dumps(data, indent=2))
    print(f"written: {out}")
    return 0 if all(run.get(f"{w}_rc", 0) == 0 for w in ("demo", "ci")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
