"""HiP (``hip``) against dense and stock, on the embedded model and synthetic caches, in one run.

    ./lcx bench hip          # writes bench/results/hip.json and hip.png

Four measurements, each comparing lcx with dense (or stock) in the same run:

(a) **Prefill attention, mask search included, against dense** at T = 4k, 8k, 16k, 32k and 64k
    tokens, one layer with SmolLM2's shapes (9 query / 3 KV heads, head_dim 64, 128-token pages),
    on the same implementation family (lcx's CPU torch twin: dense is its fused SDPA path; HiP is
    the page search plus the block-sparse twin). A log-log fit of time against T gives each
    one's growth exponent.
(b) **TTFT at about 7k tokens** on the vLLM CPU engine, HiP against stock (prefix caching off,
    median of 3).
(c) **Decode attention per layer per step at a 32k context**: the engine's op dense (stock)
    against HiP's step: the page search plus the engine's op on the page lists, and a step that
    reuses the last search (``refresh_every`` > 1).
(d) **Passkey accuracy** at about 1k, 3k and 7k tokens, 24 prompts per length (8 depths x 3
    seeds, the prompts of ``bench/streaming.py``), strict scoring, dense lcx against HiP.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming import _accuracy_prompts, _attention_child, _median_ms  # noqa: E402

HIP = {"method": "hip"}  # the shipped defaults
PREFILL_LENGTHS = (4096, 8192, 16384, 32768, 65536)
#: (d)'s arms: dense lcx and HiP on the same engine settings.
ARMS = (("dense", {"backend": "lcx", "lcx": {"method": "dense"}}), ("hip", {"backend": "lcx", "lcx": HIP}))


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def prefill_scaling(dtype_name: str) -> dict:
    """(a), in this process (``_attention_child`` runs it bound like an engine worker)."""
    import torch

    from lcx_plugin import selectors
    from lcx_plugin.kernels.paged import BatchPlan, formats, paged_attention
    from lcx_plugin.selectors import SelectContext
    from lcx_plugin.state import PageSummaries, RequestStates

    dtype = getattr(torch, dtype_name)
    hq, hkv, d, bs = 9, 3, 64, 128
    sel = selectors.get("hip").from_dict({k: v for k, v in HIP.items() if k != "method"} | {"dense_layers": []})
    out = {"dtype": dtype_name, "config": sel.to_dict(), "lengths": {}}
    for t in PREFILL_LENGTHS:
        g = torch.Generator().manual_seed(t)
        pages = t // bs
        cache = torch.zeros(pages, hkv, bs, 2 * d, dtype=dtype)
        kv = formats.plain(cache)
        table = torch.randperm(pages, generator=g).to(torch.int32)[None]
        slots = table[0].long()[torch.arange(t) // bs] * bs + torch.arange(t) % bs
        # Keys with a slow drift along the context (pages differ, as real ones do) plus noise.
        keys = (torch.randn(t, hkv, d, generator=g) + torch.randn(t // 256 + 1, hkv, d, generator=g)
                .repeat_interleave(256, 0)[:t]).to(dtype)
        kv.write(keys, torch.randn(t, hkv, d, generator=g).to(dtype), slots)
        summaries = PageSummaries(pages, hkv, d, bs)
        summaries.update(keys, slots)
        plan = BatchPlan.from_lists([t], [t], table)
        q = torch.randn(t, hq, d, generator=g).to(dtype)
        o = torch.empty_like(q)
        scale = d ** -0.5
        repeats = 2 if t <= 32768 else 1  # 64k's dense run alone takes most of a minute
        dense_ms = _timed(lambda: paged_attention(q, kv, plan, scale, o, impl="torch"), repeats)
        search_ms = []

        def hip_step():
            ctx = SelectContext(layer=5, query=q, kv=kv, plan=plan, request_ids=("r",), num_heads=hq, pages=summaries,
                                requests=RequestStates(), scale=scale)
            t0 = time.perf_counter()
            s = sel.select(ctx)
            search_ms.append((time.perf_counter() - t0) * 1e3)
            paged_attention(q, kv, plan, scale, o, s, impl="torch")

        hip_ms = _timed(hip_step, repeats)
        out["lengths"][str(t)] = {"dense_ms": dense_ms, "hip_ms": hip_ms, "search_ms": min(search_ms),
                                  "speedup": dense_ms / hip_ms}
        print(f"prefill {t}: dense {dense_ms:.0f} ms, hip {hip_ms:.0f} ms (search {min(search_ms):.0f})",
              file=sys.stderr, flush=True)
    xs = [math.log(int(t)) for t in out["lengths"]]

    def slope(key):
        ys = [math.log(v[key]) for v in out["lengths"].values()]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    out["dense_slope"], out["hip_slope"] = slope("dense_ms"), slope("hip_ms")
    return out


def attention_32k(dtype_name: str) -> dict:
    """(c), in this process: one decode step per layer at 32k, batch 1."""
    import torch

    from lcx_plugin import selectors
    from lcx_plugin.attention_backends.vllm import compat, cpu_native
    from lcx_plugin.kernels.paged import BatchPlan
    from lcx_plugin.selectors import SelectContext
    from lcx_plugin.state import PageSummaries, RequestStates

    dtype = getattr(torch, dtype_name)
    layer = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)
    hq, hkv, d, bs, ctx = 9, 3, 64, 128, 32768
    pages = ctx // bs
    g = torch.Generator().manual_seed(0)
    isa = compat.cpu_attn_isa(dtype, bs, d, "auto")
    cache = torch.zeros(pages + 4, hkv, bs, 2 * d, dtype=dtype)
    table = torch.randperm(pages + 4, generator=g)[:pages].to(torch.int32)[None]
    slots = table[0].long()[torch.arange(ctx) // bs] * bs + torch.arange(ctx) % bs
    keys = torch.randn(ctx, hkv, d, generator=g).to(dtype)
    cpu_native.write_kv(layer, keys, torch.randn(ctx, hkv, d, generator=g).to(dtype), cache, slots, isa, "auto")
    summaries = PageSummaries(pages + 4, hkv, d, bs)
    summaries.update(keys, slots)
    plan = BatchPlan.from_lists([1], [ctx], table.clone())
    q = torch.randn(1, hq, d, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5
    dense_plan = BatchPlan(plan.query_start_loc, plan.seq_lens, plan.block_table, engine=cpu_native.scheduler_metadata(
        plan, num_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype, isa=isa, kv_cache_dtype="auto"))
    stock = _median_ms(lambda: cpu_native.attention(layer, q, cache, out, dense_plan, scale=scale, kv_cache_dtype="auto"))
    kv = cpu_native.kv_format(cache, isa)
    res = {"dtype": dtype_name, "isa": isa, "context": ctx, "stock_dense_ms": stock}
    params = {k: v for k, v in HIP.items() if k != "method"} | {"dense_layers": []}
    for name, refresh in (("search_every_step", 1), ("reuse", 10**9)):
        sel = selectors.get("hip").from_dict(params | {"refresh_every": refresh})
        requests = RequestStates()

        def step():
            c = SelectContext(layer=5, query=q, kv=kv, plan=plan, request_ids=("r",), num_heads=hq, pages=summaries,
                              requests=requests, scale=scale)
            s = sel.select(c)
            cpu_native.attention_page_lists(layer, q, cache, out, plan, s, scale=scale, dtype=dtype, isa=isa,
                                            kv_cache_dtype="auto")

        res[f"hip_{name}_ms"] = _median_ms(step)
        res[f"hip_{name}_pages"] = requests.counters["hip_pages_attended"] / requests.counters["hip_pages_held"]
    res["speedup"] = {k.removesuffix("_ms"): stock / v for k, v in res.items() if k.endswith("_ms") and k != "stock_dense_ms"}
    return res


def _ttft(model, settings, log_dir) -> dict:
    from lcx_plugin.harness.batch import ArmSpec, run_arm
    from lcx_plugin.harness.prompts import long_prompt

    prompt = long_prompt(7000, seed=11)
    out = {}
    for name, kw in (("stock", {}), ("hip", {"backend": "lcx", "lcx": HIP})):
        r = run_arm(ArmSpec(model=model, prompts=[prompt], max_tokens=32, timing=True, repeats=3,
                            engine={"enable_prefix_caching": False, "max_num_batched_tokens": 8192}, **kw),
                    log_path=str(log_dir / f"hip_ttft_{name}.log"), settings=settings)
        out[name] = {"prompt_tokens": r["prompt_tokens"][0], "ttft_s": r["ttft_s"][0], "decode_tps": r["decode_tps"][0]}
    return out


def _accuracy(name, arm_kwargs, samples, model, settings, log_dir) -> dict:
    from collections import defaultdict

    from lcx_plugin.harness.ab.tasks import score
    from lcx_plugin.harness.batch import ArmSpec, run_arm

    spec = ArmSpec(model=model, prompts=[s.prompt for s in samples], max_tokens=16,
                   engine={"max_model_len": 8192, "enable_prefix_caching": False}, **arm_kwargs)
    r = run_arm(spec, log_path=str(log_dir / f"hip_acc_{name}.log"), settings=settings, timeout=7200)
    by_len, by_depth = defaultdict(list), defaultdict(list)
    for s, text in zip(samples, r["texts"]):
        ok = score(s, text).exact
        by_len[str(s.target_tokens)].append(ok)
        by_depth[f"{s.target_tokens}@{s.depth}"].append(ok)
    flat = [x for v in by_len.values() for x in v]
    return {"acc": sum(flat) / len(flat), "acc_by_length": {k: sum(v) / len(v) for k, v in by_len.items()},
            "n": {k: len(v) for k, v in by_len.items()}, "by_depth": {k: sum(v) / len(v) for k, v in by_depth.items()},
            "counters": r.get("lcx_counters", {}), "outputs": r["texts"]}


def _add_accuracy(out: Path, samples, model, settings, log_dir) -> int:
    """``--only-accuracy``: (d) added to an earlier run's (a)-(c), refused unless that run used the
    same settings (bind and dtype) as this machine chooses; the machine is recorded beside it."""
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import machine_record

    if not out.is_file():
        raise SystemExit(f"--only-accuracy adds to an earlier run's results, and {out} does not exist: "
                         "run ./lcx bench hip first")
    res = json.loads(out.read_text())
    here = {"bind": settings.bind, "dtype": settings.dtype}
    if res.get("settings") != here:
        raise SystemExit(f"{out} was measured with settings {res.get('settings')}, this machine chooses {here}: "
                         "figures from different settings are not one series; run ./lcx bench hip in full")
    machine = machine_record(settings)
    with Progress(len(ARMS), "bench hip accuracy") as p:
        for name, kw in ARMS:
            res[name] = _accuracy(name, kw, samples, model, settings, log_dir)
            p.advance(note=f"accuracy {name} {res[name]['acc']:.2f}")
    res.update({"dense_acc": res["dense"]["acc"], "acc": res["hip"]["acc"], "accuracy_machine": machine})
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print(json.dumps({k: res.get(k) for k in ("dense_acc", "acc")} | {
        "by_length": {n: (res["dense"]["acc_by_length"][n], res["hip"]["acc_by_length"][n])
                      for n in res["dense"]["acc_by_length"]}}, indent=1))
    return 0


def _kept_accuracy(out: Path, settings) -> dict:
    """``--keep-accuracy``: the results file's (d), refused unless it exists and used this machine's settings."""
    if not out.is_file():
        raise SystemExit(f"--keep-accuracy keeps an earlier run's accuracy, and {out} does not exist")
    res = json.loads(out.read_text())
    here = {"bind": settings.bind, "dtype": settings.dtype}
    if res.get("settings") != here or "hip" not in res or "dense" not in res:
        raise SystemExit(f"{out} holds no accuracy measured with the settings this machine chooses ({here}): "
                         "run ./lcx bench hip in full")
    kept = {k: res[k] for k in ("dense", "hip", "accuracy_machine") if k in res}
    return {**kept, "dense_acc": res["dense"]["acc"], "acc": res["hip"]["acc"],
            "accuracy_kept": res.get("accuracy_kept") or f"(d) from an earlier run of {out.name} (--keep-accuracy)"}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    ax = axes[0]
    lengths = res["prefill"]["lengths"]
    ts = [int(t) for t in lengths]
    for key, label, slope in (("dense_ms", "dense (torch twin, SDPA)", res["dense_slope"]),
                              ("hip_ms", "HiP (search + block-sparse twin)", res["prefill_slope"])):
        ax.loglog(ts, [lengths[str(t)][key] / 1e3 for t in ts], "o-", base=2, label=f"{label}: slope {slope:.2f}")
    ax.set_xlabel("prompt tokens (one layer)")
    ax.set_ylabel("prefill attention, seconds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    if "dense" not in res:
        ax.text(0.5, 0.5, "accuracy not measured in this run\n(--skip-accuracy)", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path, dpi=120)
        return
    names = list(res["dense"]["acc_by_length"])
    for i, (label, r) in enumerate((("dense", res["dense"]), ("HiP", res["hip"]))):
        ax.bar([j + 0.4 * i for j in range(len(names))], [r["acc_by_length"][k] for k in names], 0.4, label=label)
    ax.set_xticks([j + 0.2 for j in range(len(names))], [f"~{int(k) // 1024}k" for k in names])
    ax.set_ylabel("passkey exact-match (24 prompts/length)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)


def main() -> int:
    from transformers import AutoTokenizer

    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import choose

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/hip.json")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--skip-accuracy", action="store_true",
                      help="measure (a)-(c) only (the accuracy runs take the longest: 144 long prompts)")
    what.add_argument("--only-accuracy", action="store_true",
                      help="measure (d) only and add it to the results file's (a)-(c), which must have used "
                           "the settings this machine chooses")
    what.add_argument("--keep-accuracy", action="store_true",
                      help="measure (a)-(c) again and keep the results file's (d), which must have used the "
                           "settings this machine chooses: only after changes that leave HiP's outputs as they "
                           "were (speed work checked bit-identical); the file says which run (d) came from")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path("out/logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    model = str(prepare())
    settings = choose()
    samples = [] if args.skip_accuracy else _accuracy_prompts(AutoTokenizer.from_pretrained(model))
    if args.only_accuracy:
        return _add_accuracy(out, samples, model, settings, log_dir)
    kept = _kept_accuracy(out, settings) if args.keep_accuracy else {}
    res: dict = {"config": HIP, "settings": {"bind": settings.bind, "dtype": settings.dtype}}
    skip = args.skip_accuracy or args.keep_accuracy
    with Progress(3 if skip else 5, "bench hip") as p:
        res["prefill"] = _attention_child(settings, "hip", "prefill_scaling", timeout=3600)
        p.advance(note=f"prefill at 32k: {res['prefill']['lengths']['32768']['speedup']:.1f}x")
        res["attention_32k"] = _attention_child(settings, "hip")
        p.advance(note="decode attention at 32k")
        res["ttft_7k"] = _ttft(model, settings, log_dir)
        p.advance(note="ttft at 7k")
        for name, kw in () if skip else ARMS:
            res[name] = _accuracy(name, kw, samples, model, settings, log_dir)
            p.advance(note=f"accuracy {name} {res[name]['acc']:.2f}")
    acc = kept or ({} if skip else {"dense_acc": res["dense"]["acc"], "acc": res["hip"]["acc"]})
    res.update({
        "prefill_speedup": {t: v["speedup"] for t, v in res["prefill"]["lengths"].items()},
        "prefill_slope": res["prefill"]["hip_slope"], "dense_slope": res["prefill"]["dense_slope"],
        "ttft_ratio_7k": res["ttft_7k"]["hip"]["ttft_s"] / res["ttft_7k"]["stock"]["ttft_s"],
        "decode_attn_speedup_32k": res["attention_32k"]["speedup"]["hip_search_every_step"],
        "decode_attn_speedup_32k_reuse": res["attention_32k"]["speedup"]["hip_reuse"],
        "dense_acc": None, "acc": None, **acc,
    })
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print(json.dumps({k: res.get(k) for k in ("prefill_speedup", "prefill_slope", "dense_slope", "ttft_ratio_7k",
                                          "decode_attn_speedup_32k", "dense_acc", "acc")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
