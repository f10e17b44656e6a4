"""``streaming`` (sinks + recent window) against dense, on the embedded model, in one run.

    ./lcx bench streaming          # writes bench/results/streaming.json and .png

Three measurements, each comparing lcx with stock (or dense) in the same run:

1. **Passkey accuracy** at about 1k, 3k and 7k tokens, 24 prompts per length (8 needle depths x 3
   seeds), strict scoring (the output's 5-digit numbers must be exactly the pass key; the
   filler carries same-shaped distractor numbers), for dense lcx and for ``streaming`` at two
   window sizes. A needle outside the window is expected to be lost: this is the baseline a head
   split has to beat.
2. **TTFT and decode tokens/s at about 7k tokens**, stock against ``streaming`` (window 2048).
3. **Decode attention per layer at a 32k-token context** (SmolLM2 shapes: 9 query / 3 KV heads,
   head_dim 64, block 128): the engine's op dense (stock) against lcx's default CPU path for a
   page selection of 1/8 and 1/32 of the pages (the op on rewritten per-head block tables), and,
   for reference, lcx's torch twin on the same selections and on a sink 64 + window 1024 selection.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

LENGTHS = (1024, 3072, 7168)
DEPTHS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.85, 0.95)
SEEDS_PER_DEPTH = 3
WINDOWS = (512, 2048)
SINK = 64


def _accuracy_prompts(tokenizer):
    from lcx_plugin.harness.ab.tasks import derive_seed, generate

    return [generate("passkey", n, d, derive_seed(7, "passkey", n, d, i), tokenizer)
            for n in LENGTHS for d in DEPTHS for i in range(SEEDS_PER_DEPTH)]


def _accuracy(name, arm_kwargs, samples, model, settings, log_dir) -> dict:
    from lcx_plugin.harness.ab.tasks import score
    from lcx_plugin.harness.batch import ArmSpec, run_arm

    spec = ArmSpec(model=model, prompts=[s.prompt for s in samples], max_tokens=16,
                   engine={"max_model_len": 8192, "enable_prefix_caching": False}, **arm_kwargs)
    r = run_arm(spec, log_path=str(log_dir / f"streaming_acc_{name}.log"), settings=settings, timeout=7200)
    by_len, by_depth = defaultdict(list), defaultdict(list)
    for s, text in zip(samples, r["texts"]):
        ok = score(s, text).exact
        by_len[str(s.target_tokens)].append(ok)
        by_depth[f"{s.target_tokens}@{s.depth}"].append(ok)
    return {"acc": {k: sum(v) / len(v) for k, v in by_len.items()},
            "n": {k: len(v) for k, v in by_len.items()},
            "by_depth": {k: sum(v) / len(v) for k, v in by_depth.items()},
            "outputs": r["texts"], "wall_s": r["batch_s"]}


def _speed(model, settings, log_dir) -> dict:
    from lcx_plugin.harness.batch import ArmSpec, run_arm
    from lcx_plugin.harness.prompts import long_prompt

    prompt = long_prompt(7000, seed=11)
    out = {}
    for name, kw in (("stock", {}), ("streaming", {"backend": "lcx", "lcx": {"method": "streaming", "sink": SINK,
                                                                            "window": 2048}})):
        r = run_arm(ArmSpec(model=model, prompts=[prompt], max_tokens=64, timing=True, repeats=3,
                            engine={"enable_prefix_caching": False}, **kw),
                    log_path=str(log_dir / f"streaming_speed_{name}.log"), settings=settings)
        out[name] = {"prompt_tokens": r["prompt_tokens"][0], "ttft_s": r["ttft_s"][0], "decode_tps": r["decode_tps"][0]}
    return out


def _median_ms(fn, n=30, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def attention_32k(dtype_name: str) -> dict:
    """Per-layer decode attention at a 32k context, in this process (one engine's worth of threads)."""
    import torch

    from lcx_plugin.attention_backends.vllm import compat, cpu_native
    from lcx_plugin.kernels.paged import BatchPlan, Selection, paged_attention

    dtype = getattr(torch, dtype_name)
    layer = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)
    hq, hkv, d, bs, ctx = 9, 3, 64, 128, 32768
    pages = ctx // bs
    g = torch.Generator().manual_seed(0)
    isa = compat.cpu_attn_isa(dtype, bs, d, "auto")
    cache = torch.zeros(pages + 4, hkv, bs, 2 * d, dtype=dtype)
    table = torch.randperm(pages + 4, generator=g)[:pages].to(torch.int32)
    slots = table.long()[torch.arange(ctx) // bs] * bs + torch.arange(ctx) % bs
    cpu_native.write_kv(layer, torch.randn(ctx, hkv, d, generator=g).to(dtype),
                        torch.randn(ctx, hkv, d, generator=g).to(dtype), cache, slots, isa, "auto")
    plan = BatchPlan.from_lists([1], [ctx], table[None].clone())
    q = torch.randn(1, hq, d, generator=g).to(dtype)
    out = torch.empty_like(q)
    dense_plan = BatchPlan(plan.query_start_loc, plan.seq_lens, plan.block_table, engine=cpu_native.scheduler_metadata(
        plan, num_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype, isa=isa, kv_cache_dtype="auto"))
    stock = _median_ms(lambda: cpu_native.attention(layer, q, cache, out, dense_plan, scale=d ** -0.5,
                                                    kv_cache_dtype="auto"))
    kv = cpu_native.kv_format(cache, isa)
    res = {"dtype": dtype_name, "isa": isa, "context": ctx, "stock_dense_ms": stock}
    for frac in (8, 32):
        n = pages // frac
        idx = torch.stack([torch.cat([torch.randperm(pages - 1, generator=g)[: n - 1].sort().values,
                                      torch.tensor([pages - 1])]) for _ in range(hkv)]).to(torch.int32)[None]
        sel = Selection.build(1, hkv, indices=idx, counts=torch.full((1, hkv), n))
        res[f"lcx_pages_1/{frac}_ms"] = _median_ms(lambda: cpu_native.attention_page_lists(
            layer, q, cache, out, plan, sel, scale=d ** -0.5, dtype=dtype, isa=isa, kv_cache_dtype="auto"))
        res[f"twin_pages_1/{frac}_ms"] = _median_ms(lambda: paged_attention(q, kv, plan, d ** -0.5, out, sel, impl="torch"))
    window = Selection.build(1, hkv, sink=SINK, window=1024)
    res["twin_sink64_window1024_ms"] = _median_ms(lambda: paged_attention(q, kv, plan, d ** -0.5, out, window, impl="torch"))
    res["speedup"] = {k.removesuffix("_ms"): stock / v for k, v in res.items() if k.endswith("_ms") and k != "stock_dense_ms"}
    return res


def _attention_child(settings, module: str = "streaming", fn: str = "attention_32k", timeout: float = 1800) -> dict:
    """Run ``bench/<module>.py``'s ``fn`` (default ``attention_32k``) in a child bound like an engine
    worker (same threads and binding)."""
    import os
    import subprocess
    import sys

    from lcx_plugin.harness.launcher import child_env

    env = child_env(settings)
    cores = settings.bind.split("-")
    env["OMP_NUM_THREADS"] = str(int(cores[-1]) - int(cores[0]) + 1 if len(cores) == 2 else 1)
    code = (f"import json, sys; sys.path.insert(0, 'bench'); import {module}; "
            f"print(json.dumps({module}.{fn}({settings.dtype!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=os.getcwd(),
                          timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"bench {module} {fn} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [("dense", result["dense"])] + [(f"streaming w={r['window']}", r) for r in result["runs"]]
    fig, axes = plt.subplots(1, len(LENGTHS), figsize=(4 * len(LENGTHS), 3.6), constrained_layout=True, sharey=True)
    for ax, n in zip(axes, LENGTHS):
        for label, r in arms:
            ys = [r["by_depth"][f"{n}@{d}"] for d in DEPTHS]
            ax.plot(DEPTHS, ys, marker="o", label=f"{label} ({r['acc'][str(n)]:.2f})")
        ax.set_title(f"passkey, ~{n} tokens (n={len(DEPTHS) * SEEDS_PER_DEPTH})")
        ax.set_xlabel("needle depth")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("exact-match rate")
    fig.suptitle(f"streaming (sink {SINK}) vs dense, SmolLM2-135M; {result['machine_line']}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/streaming.json")
    ap.add_argument("--skip-accuracy", action="store_true", help="only the speed measurements")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from lcx_plugin.harness.ab.report import machine_line
    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import choose, machine_record
    from lcx_plugin.machine import cpu_info

    settings = choose()
    print(settings.line(cpu_info()), flush=True)
    model = str(prepare())
    log_dir = Path("out/logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_record(settings)
    result: dict = {"machine": machine, "machine_line": machine_line(machine)}
    steps = (0 if args.skip_accuracy else 1 + len(WINDOWS)) + 2
    with Progress(steps, "bench streaming") as progress:
        if not args.skip_accuracy:
            samples = _accuracy_prompts(AutoTokenizer.from_pretrained(model))
            result["dense"] = _accuracy("dense", {"backend": "lcx", "lcx": {"method": "dense"}}, samples, model,
                                        settings, log_dir)
            progress.advance(note=f"dense {result['dense']['acc']}")
            result["runs"] = []
            for w in WINDOWS:
                cfg = {"method": "streaming", "sink": SINK, "window": w}
                run = {"window": w, **_accuracy(f"w{w}", {"backend": "lcx", "lcx": cfg}, samples, model, settings, log_dir)}
                result["runs"].append(run)
                progress.advance(note=f"window {w}: {run['acc']}")
            result["dense_acc"] = result["dense"]["acc"]
        speed = _speed(model, settings, log_dir)
        result["speed_7k"] = speed
        result["ttft_ratio_7k"] = speed["streaming"]["ttft_s"] / speed["stock"]["ttft_s"]
        result["decode_tps_ratio_7k"] = speed["streaming"]["decode_tps"] / speed["stock"]["decode_tps"]
        progress.advance(note=f"7k: ttft ratio {result['ttft_ratio_7k']:.2f}, decode ratio {result['decode_tps_ratio_7k']:.2f}")
        attn = _attention_child(settings)
        result["attention_32k"] = attn
        result["attn_speedup_32k"] = {"1/8": attn["speedup"]["lcx_pages_1/8"], "1/32": attn["speedup"]["lcx_pages_1/32"]}
        progress.advance(note=f"32k attention speedups {result['attn_speedup_32k']}")
    result["setup"] = {"lengths": LENGTHS, "depths": DEPTHS, "seeds_per_depth": SEEDS_PER_DEPTH, "sink": SINK,
                       "windows": WINDOWS, "scoring": "strict: the output's 5-digit numbers are exactly the pass key"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if "dense" in result:
        plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result.get(k) for k in ("dense_acc", "ttft_ratio_7k", "decode_tps_ratio_7k", "attn_speedup_32k")}
                     | {"runs": [{"window": r["window"], "acc": r["acc"]} for r in result.get("runs", [])]}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
