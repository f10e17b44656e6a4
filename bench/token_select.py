"""TokenSelect (``token_select``) against stock and dense, on the embedded model, in one run.

    ./lcx bench token_select          # writes bench/results/token_select.json and .png

Five measurements, each comparing lcx with stock (or dense lcx) in the same run:

(a) **Decode attention per layer per step at a 32k-token context** (SmolLM2 shapes: 9 query / 3
    KV heads, head_dim 64, block 128, batch 8 and 1): the engine's op, dense (stock), against the whole
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

    ./lcx bench token_select --holdout   # writes bench/results/token_select_holdout.json

checks (d) on a second prompt set the configs were not chosen on: other seeds, 6 per depth (48
prompts per length), at about 1k and 3k tokens (at 7k the embedded model fails dense too).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming import _accuracy_prompts, _attention_child, _median_ms  # noqa: E402

SINK, WINDOW = 64, 128
#: The budgets under test: tokens beyond sinks and window (the page variant rounds up to pages of 128).
TOKEN = {"method": "token_select", "sink": SINK, "window": WINDOW, "budget": 512, "granularity": "token",
         "reuse_similarity": 0.9}
PAGE = {**TOKEN, "budget": 256, "granularity": "page"}
#: The page variant at a larger budget: what reading more costs and buys (accuracy only).
PAGE_WIDE = {**PAGE, "budget": 512}


def attention_32k(dtype_name: str) -> dict:
    """(a) at batch 1 and 8, in this process (``_attention_child`` runs it bound like an engine worker)."""
    return {"dtype": dtype_name, **{f"batch{b}": _attention_32k(dtype_name, b) for b in (1, 8)}}


def _attention_32k(dtype_name: str, batch: int) -> dict:
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
    g = torch.Generator().manual_seed(batch)
    isa = compat.cpu_attn_isa(dtype, bs, d, "auto")
    n_blocks = batch * pages + 4
    cache = torch.zeros(n_blocks, hkv, bs, 2 * d, dtype=dtype)
    table = torch.randperm(n_blocks, generator=g)[: batch * pages].to(torch.int32).view(batch, pages)
    summaries = PageSummaries(n_blocks, hkv, d, bs)
    for b in range(batch):
        slots = table[b].long()[torch.arange(ctx) // bs] * bs + torch.arange(ctx) % bs
        keys = torch.randn(ctx, hkv, d, generator=g).to(dtype)
        cpu_native.write_kv(layer, keys, torch.randn(ctx, hkv, d, generator=g).to(dtype), cache, slots, isa, "auto")
        summaries.update(keys, slots)
    plan = BatchPlan.from_lists([1] * batch, [ctx] * batch, table.clone())
    q = torch.randn(batch, hq, d, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5
    dense_plan = BatchPlan(plan.query_start_loc, plan.seq_lens, plan.block_table, engine=cpu_native.scheduler_metadata(
        plan, num_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype, isa=isa, kv_cache_dtype="auto"))
    stock = _median_ms(lambda: cpu_native.attention(layer, q, cache, out, dense_plan, scale=scale, kv_cache_dtype="auto"))
    kv = cpu_native.kv_format(cache, isa)
    ids = tuple(f"r{b}" for b in range(batch))
    res = {"isa": isa, "context": ctx, "batch": batch, "stock_dense_ms": stock}
    for name, cfg in (("page", PAGE), ("token", TOKEN)):
        params = {k: v for k, v in cfg.items() if k != "method"}
        for reuse in (False, True):
            sel = selectors.get("token_select")(**{**params, "reuse_similarity": 0.0 if reuse else None})
            requests = RequestStates()

            def step():
                c = SelectContext(layer=0, query=q, kv=kv, plan=plan, request_ids=ids, num_heads=hq,
                                  pages=summaries, requests=requests, scale=scale)
                s = sel.select(c)
                if name == "page":
                    cpu_native.attention_page_lists(layer, q, cache, out, plan, s, scale=scale, dtype=dtype, isa=isa,
                                                    kv_cache_dtype="auto")
                else:
                    paged_attention(q, kv, plan, scale, out, s, impl="torch")

            key = f"{name}{'_cached' if reuse else ''}"
            res[f"{key}_ms"] = _median_ms(step, n=20 if batch > 1 or name == "token" else 30)
            res[f"{key}_kv_bytes_ratio"] = _bytes_ratio(requests.counters)
    res["speedup"] = {k.removesuffix("_ms"): stock / v for k, v in res.items() if k.endswith("_ms") and k != "stock_dense_ms"}
    return res


PARTS = ("attention", "e2e", "accuracy")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _holdout(model: str, settings, log_dir: Path, out: Path) -> int:
    """Accuracy only, on prompts of another seed base: dense, both variants and the wider page budget."""
    from lcx_plugin.harness.ab.tasks import derive_seed, generate
    from lcx_plugin.harness.progress import Progress
    from streaming import DEPTHS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = [generate("passkey", n, d, derive_seed(8, "passkey", n, d, i), tokenizer)
               for n in (1024, 3072) for d in DEPTHS for i in range(6)]
    res: dict = {"prompts": "passkey, seed base 8, 8 depths x 6 seeds at ~1k and ~3k tokens"}
    arms = (("dense", {"method": "dense"}), ("token", TOKEN), ("page", PAGE), ("page_wide", PAGE_WIDE))
    with Progress(len(arms), "bench token_select --holdout") as p:
        for name, cfg in arms:
            r = _accuracy(f"holdout_{name}", {"backend": "lcx", "lcx": cfg}, samples, model, settings, log_dir)
            res[name] = {"config": cfg, **{k: r[k] for k in ("acc", "acc_by_length", "n", "kv_bytes_read_ratio",
                                                            "cache_hit_rate", "outputs")}}
            p.advance(note=f"{name} {r['acc']:.2f}")
    res["settings"] = {"bind": settings.bind, "dtype": settings.dtype}
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v["acc_by_length"] for k, v in res.items() if isinstance(v, dict) and "acc_by_length" in v}, indent=1))
    return 0


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
        r = run_arm(ArmSpec(model=model, prompts=prompts[:batch], max_tokens=48, batch_timing=True, repeats=3,
                            engine={"enable_prefix_caching": True, "max_model_len": 8192}, **arm_kwargs),
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
    arms = [("dense", result["dense"]), ("token 512", result["token"]), ("page 256", result["page"])]
    if "page_wide" in result:
        arms.append(("page 512", result["page_wide"]))
    lengths = list(result["dense"]["acc_by_length"])
    width = 0.8 / len(arms)
    for i, (label, r) in enumerate(arms):
        ax.bar([j + i * width for j in range(len(lengths))], [r["acc_by_length"][k] for k in lengths], width, label=label)
    ax.set_xticks([j + 1.5 * width for j in range(len(lengths))], [f"~{int(k) // 1024}k" for k in lengths])
    ax.set_ylabel("passkey exact-match (24 prompts/length)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    names = ["page", "page_cached", "token", "token_cached"]
    for i, b in enumerate((1, 8)):
        a = result["attention_32k"][f"batch{b}"]["speedup"]
        ax.bar([j + 0.4 * i for j in range(len(names))], [a[n] for n in names], 0.4, label=f"batch {b}")
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.legend(fontsize=8)
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
    ap.add_argument("--out", default=None, help="default: bench/results/token_select.json "
                    "(with --holdout: bench/results/token_select_holdout.json)")
    ap.add_argument("--holdout", action="store_true", help="accuracy only, on a second prompt set (see above)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated subset of attention,e2e,accuracy (default: all); a subset replaces those "
                         "parts in the existing result")
    args = ap.parse_args()
    out = Path(args.out or f"bench/results/token_select{'_holdout' if args.holdout else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path("out/logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    model = str(prepare())
    settings = choose()
    if args.holdout:
        return _holdout(model, settings, log_dir, out)
    parts = args.parts.split(",")
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        ap.error(f"--parts: unknown {bad}; choose from {list(PARTS)}")
    # A part run alone replaces that part in the existing result; each part compares lcx with
    # stock (or dense) within itself, and ``measured`` says when and at which commit each was.
    res: dict = json.loads(out.read_text()) if set(parts) != set(PARTS) and out.exists() else {}
    res.update({"token_config": TOKEN, "page_config": PAGE, "page_wide_config": PAGE_WIDE})
    stamp = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "settings": {"bind": settings.bind, "dtype": settings.dtype}}
    steps = {"attention": 1, "e2e": 2, "accuracy": 4}
    with Progress(sum(steps[x] for x in parts), "bench token_select") as p:
        if "attention" in parts:
            res["attention_32k"] = _attention_child(settings, "token_select")
            p.advance(note="attention at 32k")
        if "e2e" in parts:
            for name, kw in (("stock", {}), ("page", {"backend": "lcx", "lcx": PAGE})):
                res[f"e2e_{name}"] = _e2e(name, kw, model, settings, log_dir)
                p.advance(note=f"e2e {name}")
        if "accuracy" in parts:
            samples = _accuracy_prompts(AutoTokenizer.from_pretrained(model))
            for name, kw in (("dense", {"backend": "lcx", "lcx": {"method": "dense"}}),
                             ("token", {"backend": "lcx", "lcx": TOKEN}), ("page", {"backend": "lcx", "lcx": PAGE}),
                             ("page_wide", {"backend": "lcx", "lcx": PAGE_WIDE})):
                res[name] = _accuracy(name, kw, samples, model, settings, log_dir)
                p.advance(note=f"accuracy {name} {res[name]['acc']:.2f}")
    res.setdefault("measured", {}).update({x: stamp for x in parts})
    e2e_counters = res["e2e_page"]["batch8"]["counters"]
    res.update({
        # The page variant scoring every step (no cache hit), at the batch of the end-to-end target
        # (8); one sequence alone is listed too: there the step's fixed cost of launching its
        # small index operations, not the KV it reads, sets lcx's time.
        "attn_speedup_32k": res["attention_32k"]["batch8"]["speedup"]["page"],
        "attn_speedup_32k_batch1": res["attention_32k"]["batch1"]["speedup"]["page"],
        "e2e_decode_tps_ratio": {f"batch{b}": res["e2e_page"][f"batch{b}"]["decode_tps"]
                                 / res["e2e_stock"][f"batch{b}"]["decode_tps"] for b in (1, 8)},
        "kv_bytes_read_ratio": _bytes_ratio(e2e_counters),
        "dense_acc": res["dense"]["acc"], "acc": res["token"]["acc"], "acc_page": res["page"]["acc"],
        "acc_page_wide": res.get("page_wide", {}).get("acc"),
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
