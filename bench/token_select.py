"""TokenSelect (``token_select``) against stock and dense, on the embedded model, in one run.

    ./lcx bench token_select          # writes bench/results/token_select.json and .png

Five measurements, each comparing lcx with stock (or dense lcx) in the same run:

(a) **Decode attention per layer per step at a 32k-token context** (SmolLM2 shapes: 9 query / 3
    KV heads, head_dim 64, block 128, batch 1): the engine's op, dense (stock), against the whole
    lcx step: the selector's scoring pass, soft vote and top-k, then attention over the selection
    (the engine's op on per-head page lists for the page variant; the torch twin for tokens).
    Also a step that reuses the cached selection (no scoring).
(b) **End-to-end decode tokens/s at about 7k tokens** on the vLLM CPU engine, batch 1 and batch 8,
    the page variant against stock.
(c) **KV bytes read per decode token**, counted by the selector from its real selections in (b)
    and in the accuracy runs, the scoring pass included, against what dense attention reads.
(d) **Passkey accuracy** at about 1k, 3k and 7k tokens, 24 prompts per length (8 depths x 3
    seeds, the prompts of ``bench/streaming.py``), strict scoring, for dense lcx and for
    TokenSelect at both granularities.
(e) **Selection-cache hit rate**, from the same runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming import _accuracy_prompts, _median_ms  # noqa: E402

SINK, WINDOW = 64, 128
#: The budgets under test: tokens beyond sinks and window (the page variant rounds up to pages of 128).
TOKEN = {"method": "token_select", "sink": SINK, "window": WINDOW, "budget": 512, "granularity": "token",
         "reuse_similarity": 0.9}
PAGE = {**TOKEN, "budget": 256, "granularity": "page"}


def attention_32k(dtype_name: str) -> dict:
    """(a), in this process (run it in a child bound like an engine worker: ``_attention_child``)."""
    import torch

    from lcx_plugin import selectors
    from lcx_plugin.attention_backends.vllm import compat, cpu_native
    from lcx_plugin.kernels.paged import BatchPlan, paged_attention
    from lcx_plugin.selectors import SelectContext
    from lcx_plugin.state import PageSummaries, RequestStates

    dtype = getattr(torch, dtype_name)
    layer = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)
    hq, hkv, d, bs, ctx = 9, 3, 64, 128, 32768
    pages = ctx // bs
    g = torch.Generator().manual_seed(0)
    isa = compat.cpu_attn_isa(dtype, bs, d, "auto")
    cache = torch.zeros(pages + 4, hkv, bs, 2 * d, dtype=dtype)
    table = torch.randperm(pages + 4, generator=g)[:pages].to(torch.int32)
    slots = table.long()[torch.arange(ctx) // bs] * bs + torch.arange(ctx) % bs
    keys = torch.randn(ctx, hkv, d, generator=g).to(dtype)
    cpu_native.write_kv(layer, keys, torch.randn(ctx, hkv, d, generator=g).to(dtype), cache, slots, isa, "auto")
    summaries = PageSummaries(pages + 4, hkv, d, bs)
    summaries.update(keys, slots)
    plan = BatchPlan.from_lists([1], [ctx], table[None].clone())
    q = torch.randn(1, hq, d, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5
    dense_plan = BatchPlan(plan.query_start_loc, plan.seq_lens, plan.block_table, engine=cpu_native.scheduler_metadata(
        plan, num_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype, isa=isa, kv_cache_dtype="auto"))
    stock = _median_ms(lambda: cpu_native.attention(layer, q, cache, out, dense_plan, scale=scale, kv_cache_dtype="auto"))
    kv = cpu_native.kv_format(cache, isa)
    res = {"dtype": dtype_name, "isa": isa, "context": ctx, "stock_dense_ms": stock}
    for name, cfg in (("page", PAGE), ("token", TOKEN)):
        params = {k: v for k, v in cfg.items() if k != "method"}
        for reuse in (False, True):
            sel = selectors.get("token_select")(**{**params, "reuse_similarity": 0.0 if reuse else None})
            requests = RequestStates()

            def step():
                c = SelectContext(layer=0, query=q, kv=kv, plan=plan, request_ids=("r",), num_heads=hq,
                                  pages=summaries, requests=requests, scale=scale)
                s = sel.select(c)
                if name == "page":
                    cpu_native.attention_page_lists(layer, q, cache, out, plan, s, scale=scale, dtype=dtype, isa=isa,
                                                    kv_cache_dtype="auto")
                else:
                    paged_attention(q, kv, plan, scale, out, s, impl="torch")

            key = f"{name}{'_cached' if reuse else ''}_ms"
            res[key] = _median_ms(step)
            c = requests.counters
            res[f"{name}{'_cached' if reuse else ''}_kv_bytes_ratio"] = c["kv_bytes_dense"] / (
                c["kv_bytes_scoring"] + c["kv_bytes_attention"])
    res["speedup"] = {k.removesuffix("_ms"): stock / v for k, v in res.items() if k.endswith("_ms") and k != "stock_dense_ms"}
    return res


def _attention_child(settings) -> dict:
    import os
    import subprocess

    from lcx_plugin.harness.launcher import child_env

    env = child_env(settings)
    cores = settings.bind.split("-")
    env["OMP_NUM_THREADS"] = str(int(cores[-1]) - int(cores[0]) + 1 if len(cores) == 2 else 1)
    code = ("import json, sys; sys.path.insert(0, 'bench'); import token_select; "
            f"print(json.dumps(token_select.attention_32k({settings.dtype!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=os.getcwd(),
                          timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _bytes_ratio(counters: dict) -> float | None:
    read = counters.get("kv_bytes_scoring", 0) + counters.get("kv_bytes_attention", 0)
    return counters["kv_bytes_dense"] / read if read else None


def _hit_rate(counters: dict) -> float | None:
    n = counters.get("selection_lookups", 0)
    return counters.get("selection_hits", 0) / n if n else None


def _accuracy(name: str, arm_kwargs: dict, samples, model: str, settings, log_dir: Path) -> dict:
    from lcx_plugin.harness.ab.tasks import score
    from lcx_plugin.harness.batch import ArmSpec, run_arm

    spec = ArmSpec(model=model, prompts=[s.prompt for s in samples], max_tokens=16,
                   engine={"max_model_len": 8192, "enable_prefix_caching": False}, **arm_kwargs)
    r = run_arm(spec, log_path=str(log_dir / f"token_select_acc_{name}.log"), settings=settings, timeout=7200)
    by_len = defaultdict(list)
    for s, text in zip(samples, r["texts"]):
        by_len[str(s.target_tokens)].append(score(s, text).exact)
    flat = [x for v in by_len.values() for x in v]
    counters = r.get("lcx_counters", {})
    return {"acc": sum(flat) / len(flat), "acc_by_length": {k: sum(v) / len(v) for k, v in by_len.items()},
            "n": {k: len(v) for k, v in by_len.items()}, "counters": counters, "kv_bytes_read_ratio": _bytes_ratio(counters)
            if counters.get("kv_bytes_dense") else None, "cache_hit_rate": _hit_rate(counters), "outputs": r["texts"]}


def _e2e(name: str, arm_kwargs: dict, model: str, settings, log_dir: Path) -> dict:
    """(b): decode tokens/s at about 7k tokens, batch 1 and batch 8; (c) from the batch run."""
    from lcx_plugin.harness.batch import ArmSpec, run_arm
    from lcx_plugin.harness.prompts import long_prompt

    prompts = [long_prompt(7000, seed=40 + i, key=str(5000 + i)) for i in range(8)]
    out = {}
    for batch in (1, 8):
        r = run_arm(ArmSpec(model=model, prompts=prompts[:batch], max_tokens=48, batch_timing=True, repeats=2,
                            engine={"enable_prefix_caching": False, "max_model_len": 8192}, **arm_kwargs),
                    log_path=str(log_dir / f"token_select_e2e_{name}_b{batch}.log"), settings=settings, timeout=3600)
        out[f"batch{batch}"] = {**r["batch_timing"], "prompt_tokens": r["prompt_tokens"],
                                "counters": r.get("lcx_counters", {})}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    ax = axes[0]
    arms = [("dense", result["dense"]), ("token", result["token"]), ("page", result["page"])]
    lengths = list(result["dense"]["acc_by_length"])
    width = 0.8 / len(arms)
    for i, (label, r) in enumerate(arms):
        ax.bar([j + i * width for j in range(len(lengths))], [r["acc_by_length"][k] for k in lengths], width, label=label)
    ax.set_xticks([j + width for j in range(len(lengths))], [f"~{int(k) // 1024}k" for k in lengths])
    ax.set_ylabel("passkey exact-match (24 prompts/length)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    a = result["attention_32k"]["speedup"]
    names = ["page", "page_cached", "token", "token_cached"]
    ax.bar(names, [a[n] for n in names], color="tab:green")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("decode attention at 32k: stock time / lcx time")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)


def main() -> int:
    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import choose
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/token_select.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    model = str(prepare())
    settings = choose()
    samples = _accuracy_prompts(AutoTokenizer.from_pretrained(model))
    res: dict = {"token_config": TOKEN, "page_config": PAGE}
    with Progress(8, "bench token_select") as p:
        res["attention_32k"] = _attention_child(settings)
        p.advance(note="attention at 32k")
        for name, kw in (("stock", {}), ("page", {"backend": "lcx", "lcx": PAGE})):
            res[f"e2e_{name}"] = _e2e(name, kw, model, settings, log_dir)
            p.advance(note=f"e2e {name}")
        for name, kw in (("dense", {"backend": "lcx", "lcx": {"method": "dense"}}),
                         ("token", {"backend": "lcx", "lcx": TOKEN}), ("page", {"backend": "lcx", "lcx": PAGE})):
            res[name] = _accuracy(name, kw, samples, model, settings, log_dir)
            p.advance(note=f"accuracy {name} {res[name]['acc']:.2f}")
    e2e_counters = res["e2e_page"]["batch8"]["counters"]
    res.update({
        "attn_speedup_32k": res["attention_32k"]["speedup"]["page"],
        "e2e_decode_tps_ratio": {f"batch{b}": res["e2e_page"][f"batch{b}"]["decode_tps"]
                                 / res["e2e_stock"][f"batch{b}"]["decode_tps"] for b in (1, 8)},
        "kv_bytes_read_ratio": _bytes_ratio(e2e_counters),
        "dense_acc": res["dense"]["acc"], "acc": res["token"]["acc"], "acc_page": res["page"]["acc"],
        "cache_hit_rate": _hit_rate(e2e_counters),
        "settings": {"bind": settings.bind, "dtype": settings.dtype},
    })
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print(json.dumps({k: res[k] for k in ("attn_speedup_32k", "e2e_decode_tps_ratio", "kv_bytes_read_ratio",
                                          "dense_acc", "acc", "acc_page", "cache_hit_rate")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
