"""Dense lcx vs the stock vLLM CPU backend, in one run: prefill TTFT and decode tokens/s.

    ./lcx bench dense_vs_stock     # writes bench/results/dense_vs_stock.json

Each arm is a fresh engine on the embedded SmolLM2-135M (eager, prefix caching off so that a
repeated prompt is really prefilled again). Per context length: TTFT is the median time of a
1-token request; decode tokens/s is (N-1) / (median N-token time - median TTFT). Ratios are
lcx/stock from the same run, because the machine is shared and noisy: higher is better for
tokens/s, lower for TTFT. The lcx arms are the default CPU path ("auto": lcx drives the
engine's paged op) and lcx's own torch twin ("torch").
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lcx_plugin.harness.batch import ArmSpec, run_arm
from lcx_plugin.harness.model import prepare
from lcx_plugin.harness.prompts import long_prompt
from lcx_plugin.harness.settings import choose, machine_record

ARMS = {
    "stock": dict(backend=None, lcx=None),
    "lcx": dict(backend="lcx", lcx={"method": "dense", "kernel": "auto"}),
    "lcx_torch_twin": dict(backend="lcx", lcx={"method": "dense", "kernel": "torch"}),
}


def plot(result: dict, path: Path) -> None:
    """Bars of lcx/stock per context length: decode tokens/s (higher is better) and TTFT (lower)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_context"]
    labels = [f"{r['prompt_tokens']} tok" for r in rows]
    arms = (("lcx", "lcx (default CPU path)"), ("lcx_torch_twin", "lcx torch twin"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, metric, title in ((axes[0], "decode_tps_ratio", "decode tokens/s, lcx / stock (higher is better)"),
                              (axes[1], "ttft_ratio", "TTFT, lcx / stock (lower is better)")):
        width = 0.38
        for k, (arm, name) in enumerate(arms):
            xs = [i + (k - 0.5) * width for i in range(len(rows))]
            vals = [r[f"{arm}_{metric}"] for r in rows]
            bars = ax.bar(xs, vals, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("dense lcx vs stock vLLM CPU backend, SmolLM2-135M, one run")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1000,6000", help="approximate prompt lengths in tokens")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/dense_vs_stock.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return 0

    settings = choose()
    model = str(prepare())
    contexts = [int(c) for c in args.contexts.split(",")]
    prompts = [long_prompt(c, seed=10 + i) for i, c in enumerate(contexts)]
    engine = {"enable_prefix_caching": False, "max_model_len": 8192}
    runs = {}
    for i, (name, arm) in enumerate(ARMS.items(), 1):
        print(f"[{i}/{len(ARMS)}] {name}: engine start + {len(prompts)} contexts x {args.repeats} repeats ...", flush=True)
        t0 = time.perf_counter()
        runs[name] = run_arm(ArmSpec(model=model, prompts=prompts, max_tokens=args.max_tokens, engine=engine,
                                     timing=True, repeats=args.repeats, **arm), settings=settings)
        print(f"      done in {time.perf_counter() - t0:.0f} s: ttft {['%.3f' % t for t in runs[name]['ttft_s']]} s, "
              f"decode {['%.1f' % t for t in runs[name]['decode_tps']]} tok/s", flush=True)

    per_context = []
    for j, tokens in enumerate(runs["stock"]["prompt_tokens"]):
        row = {"prompt_tokens": tokens}
        for name in ARMS:
            row[f"{name}_ttft_s"] = runs[name]["ttft_s"][j]
            row[f"{name}_decode_tps"] = runs[name]["decode_tps"][j]
        for name in ("lcx", "lcx_torch_twin"):
            row[f"{name}_ttft_ratio"] = row[f"{name}_ttft_s"] / row["stock_ttft_s"]
            row[f"{name}_decode_tps_ratio"] = row[f"{name}_decode_tps"] / row["stock_decode_tps"]
        per_context.append(row)

    def geo(key):
        prod = 1.0
        for r in per_context:
            prod *= r[key]
        return prod ** (1 / len(per_context))

    result = {
        "ttft_ratio": geo("lcx_ttft_ratio"),
        "decode_tps_ratio": geo("lcx_decode_tps_ratio"),
        "torch_twin_ttft_ratio": geo("lcx_torch_twin_ttft_ratio"),
        "torch_twin_decode_tps_ratio": geo("lcx_torch_twin_decode_tps_ratio"),
        "note": "ratios are lcx/stock, geometric mean over contexts; tps higher is better, ttft lower is better",
        "per_context": per_context,
        "setup": {"model": "SmolLM2-135M-Instruct", "max_tokens": args.max_tokens, "repeats": args.repeats,
                  "engine": engine, "eager": True},
        "machine": machine_record(settings),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k.endswith("ratio")}, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
