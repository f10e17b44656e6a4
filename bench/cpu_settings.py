"""Which vLLM CPU settings suit this machine: thread binding and dtype, measured on stock vLLM.

    ./lcx bench cpu-settings          # writes bench/results/cpu_settings.json

For each binding (vLLM's default ``auto``, every core ``0-{n-1}``, ``nobind``) and each dtype
(bfloat16, float32), one engine on the embedded model prefills a ~3,000-token prompt (TTFT, the
median of 3) and decodes 64 tokens (tokens/s). The settings lcx's own runs use
(``lcx_plugin/harness/settings.py``) were chosen from this table; every run records its machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lcx_plugin.harness.batch import ArmSpec, run_arm
from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.progress import Progress
from lcx_plugin.harness.prompts import long_prompt
from lcx_plugin.harness.settings import choose, machine_record
from lcx_plugin.machine import cpu_info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/cpu_settings.json")
    ap.add_argument("--tokens", type=int, default=3000)
    args = ap.parse_args()
    info = cpu_info()
    binds = ["auto", f"0-{info.cores - 1}", "nobind"]
    configs = [(b, d) for d in ("bfloat16", "float32") for b in binds]
    prompt = long_prompt(args.tokens, seed=3)
    rows = []
    with Progress(len(configs), "cpu settings") as progress:
        for bind, dtype in configs:
            settings = choose(bind=bind, dtype=dtype)
            t0 = time.perf_counter()
            r = run_arm(ArmSpec(model=str(prepare()), prompts=[prompt], max_tokens=64, timing=True, repeats=3,
                                engine={"enable_prefix_caching": False}), settings=settings)
            rows.append({"bind": bind, "dtype": dtype, "prompt_tokens": r["prompt_tokens"][0], "ttft_s": r["ttft_s"][0],
                         "decode_tps": r["decode_tps"][0], "startup_s": r["startup_s"], "wall_s": time.perf_counter() - t0})
            progress.advance(note=f"bind={bind} dtype={dtype}: ttft {r['ttft_s'][0]:.2f} s, decode {r['decode_tps'][0]:.1f} tok/s")
    chosen = choose()
    result = {"machine": machine_record(chosen), "chosen": chosen.describe(), "runs": rows,
              "note": "stock vLLM CPU, eager, prefix caching off; TTFT of one prompt (median of 3), decode tokens/s over 64 tokens"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"bind={r['bind']:8s} dtype={r['dtype']:9s} TTFT {r['ttft_s']:.2f} s  decode {r['decode_tps']:.1f} tok/s")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
