"""Turn two arms' raw results into the A/B report: statistics, a terminal table, JSON and PNGs."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .stats import mcnemar, paired_bootstrap_diff, percentile_with_ci, wilson_interval
from .tasks import SHARED_CONTEXT_TASKS

PERCENTILES = (50, 90, 99)


def _paired(a_rows, b_rows):
    key = lambda r: (r["task"], r["target_tokens"], r["depth"], r["seed"], r.get("turn", 0))  # noqa: E731
    b_by = {key(r): r for r in b_rows}
    pairs = [(r, b_by[key(r)]) for r in a_rows if key(r) in b_by]
    if len(pairs) != len(a_rows) or len(pairs) != len(b_rows):
        raise ValueError("the two arms were not run on the same prompts")
    return pairs


def _compare(pairs) -> dict:
    """Exact-match rates (strict: a named distractor is wrong) with paired statistics, and the mean
    partial-credit score as a separate column."""
    a = [p[0]["score"] for p in pairs]
    b = [p[1]["score"] for p in pairs]
    a_ok = [bool(p[0]["exact"]) for p in pairs]
    b_ok = [bool(p[1]["exact"]) for p in pairs]
    return {
        "n": len(pairs),
        "A": {"mean_score": sum(a) / len(a), "exact": sum(a_ok), "exact_ci": wilson_interval(sum(a_ok), len(a))},
        "B": {"mean_score": sum(b) / len(b), "exact": sum(b_ok), "exact_ci": wilson_interval(sum(b_ok), len(b))},
        "mcnemar": mcnemar(a_ok, b_ok),
        "bootstrap": paired_bootstrap_diff([float(x) for x in a_ok], [float(x) for x in b_ok]),
        "partial_bootstrap": paired_bootstrap_diff(a, b),
    }


def _latency(load: dict) -> dict:
    out = {"tokens_per_s": load["tokens_per_s"], "concurrency": load["concurrency"]}
    for metric in ("ttft_s", "tpot_s"):
        values = [r[metric] for r in load["requests"] if r[metric] is not None]
        out[metric] = {f"p{q}": percentile_with_ci(values, q) for q in PERCENTILES} if values else None
    return out


def _ratio(num, den) -> float | None:
    return num / den if num and den else None


def verdict(kv: dict, speed: dict, overall: dict) -> dict:
    """B against A in one line: KV capacity, decode at batch, TTFT (each B's gain: > 1 is better for B)
    and the paired accuracy difference with its 95% interval, in points."""
    out = {"kv_capacity_ratio": _ratio(kv.get("B"), kv.get("A")), "decode_ratio": None, "ttft_speedup": None}
    sa, sb = speed.get("A"), speed.get("B")
    parts = [f"KV capacity {out['kv_capacity_ratio']:.1f}x" if out["kv_capacity_ratio"] else "KV capacity n/a"]
    if sa and sb:
        out["decode_ratio"] = _ratio(sb["decode_tokens_per_s"], sa["decode_tokens_per_s"])
        out["ttft_speedup"] = _ratio(sa["ttft_s"], sb["ttft_s"])
        out["batch"] = sb["batch"]
        parts += [f"decode {out['decode_ratio']:.2f}x at batch {sb['batch']}", f"TTFT {out['ttft_speedup']:.2f}x faster"
                  if out["ttft_speedup"] >= 1 else f"TTFT {1 / out['ttft_speedup']:.2f}x slower"]
    bs = overall["bootstrap"]
    out["accuracy_diff_pt"] = 100 * bs["diff"]
    out["accuracy_ci_pt"] = [100 * bs["low"], 100 * bs["high"]]
    parts.append(f"accuracy {100 * bs['diff']:+.1f} pt [{100 * bs['low']:+.1f}, {100 * bs['high']:+.1f}] "
                 f"(n={overall['n']} paired)")
    out["line"] = ", ".join(parts)
    return out


def summarize(a: dict, b: dict, setup: dict) -> dict:
    pairs = _paired(a["samples"], b["samples"])
    groups, turns = defaultdict(list), defaultdict(list)
    for p in pairs:
        groups[(p[0]["task"], p[0]["target_tokens"])].append(p)
        if p[0]["task"] in SHARED_CONTEXT_TASKS:
            turns[(p[0]["task"], p[0]["target_tokens"], p[0].get("turn", 0))].append(p)
    cells = defaultdict(lambda: {"A": [], "B": []})
    for ra, rb in pairs:
        k = (ra["task"], ra["target_tokens"], ra["depth"])
        cells[k]["A"].append(ra["score"])
        cells[k]["B"].append(rb["score"])
    overall = _compare(pairs)
    kv = {"A": a.get("kv_capacity_tokens"), "B": b.get("kv_capacity_tokens")}
    speed = {"A": a.get("speed"), "B": b.get("speed")}
    return {
        "verdict": verdict(kv, speed, overall),
        "setup": setup,
        "arms": {"A": a["arm"], "B": b["arm"]},
        "kv_capacity_tokens": kv,
        "speed": speed,
        "accuracy": {
            "overall": overall,
            "by_task_length": [{"task": t, "length": n, **_compare(ps)} for (t, n), ps in sorted(groups.items())],
            "by_turn": [{"task": t, "length": n, "turn": k, **_compare(ps)} for (t, n, k), ps in sorted(turns.items())],
            "cells": [{"task": t, "length": n, "depth": d, "A": sum(v["A"]) / len(v["A"]), "B": sum(v["B"]) / len(v["B"])}
                      for (t, n, d), v in sorted(cells.items())],
        },
        "latency": {"A": _latency(a["load"]), "B": _latency(b["load"])},
        "raw": {"A": a, "B": b},
    }


def machine_line(machine: dict | None) -> str:
    if not machine:
        return "machine: not recorded"
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx") if machine.get(f)) or "no AVX2"
    st = machine.get("settings", {})
    return (f"machine: {machine.get('cpu')} ({isa}; {machine.get('cores')} cores), threads bind={st.get('bind')}, "
            f"dtype={st.get('dtype')}, vLLM {machine.get('vllm')}")


def markdown(summary: dict) -> str:
    """The report's two tables in Markdown (for READMEs and PR descriptions), under its machine line."""
    acc = summary["accuracy"]
    la, lb = summary["arms"]["A"]["label"], summary["arms"]["B"]["label"]
    lines = [f"**{la} → {lb}: {summary['verdict']['line']}**", "",
             f"{machine_line(summary['setup'].get('machine'))}", "",
             f"| task | length | n | A = {la}: exact [95% CI] | B = {lb}: exact [95% CI] | McNemar p | "
             "B−A exact [95% CI] | A / B partial |",
             "|---|---|---|---|---|---|---|---|"]
    for row in acc["by_task_length"] + [{"task": "**all**", "length": "", **acc["overall"]}]:
        cells = []
        for side in ("A", "B"):
            lo, hi = row[side]["exact_ci"]
            cells.append(f"{row[side]['exact'] / row['n']:.2f} [{lo:.2f}, {hi:.2f}]")
        bs = row["bootstrap"]
        lines.append(f"| {row['task']} | {row['length']} | {row['n']} | {cells[0]} | {cells[1]} | "
                     f"{row['mcnemar']['p_value']:.3g} | {bs['diff']:+.2f} [{bs['low']:+.2f}, {bs['high']:+.2f}] | "
                     f"{row['A']['mean_score']:.2f} / {row['B']['mean_score']:.2f} |")
    if acc.get("by_turn"):
        lines += ["", "Shared-context tasks, per question (`multiturn`: turn t's prompt extends turn t-1's; "
                  "`sharedctx`: one request per question over the same context):", "",
                  f"| task | length | turn | n | A = {la}: exact | B = {lb}: exact | McNemar p |", "|---|---|---|---|---|---|---|"]
        for row in acc["by_turn"]:
            lines.append(f"| {row['task']} | {row['length']} | {row['turn'] + 1} | {row['n']} | "
                         f"{row['A']['exact'] / row['n']:.2f} | {row['B']['exact'] / row['n']:.2f} | "
                         f"{row['mcnemar']['p_value']:.3g} |")
    lines += ["", "| arm | TTFT p50 s | TTFT p90 s | TTFT p99 s | TPOT p50 ms | output tok/s | KV capacity at bf16 (tokens) |",
              "|---|---|---|---|---|---|---|"]
    for side, label in (("A", la), ("B", lb)):
        lat = summary["latency"][side]
        t = lat["ttft_s"]
        cells = [f"{t[f'p{q}']['value']:.2f} [{t[f'p{q}']['low']:.2f}, {t[f'p{q}']['high']:.2f}]" for q in PERCENTILES]
        tp = lat["tpot_s"]["p50"]
        lines.append(f"| {side}: {label} | {' | '.join(cells)} | {tp['value'] * 1e3:.1f} [{tp['low'] * 1e3:.1f}, "
                     f"{tp['high'] * 1e3:.1f}] | {lat['tokens_per_s']:.1f} | {summary['kv_capacity_tokens'][side] or 'n/a'} |")
    sp = summary.get("speed") or {}
    if sp.get("A") and sp.get("B"):
        cfg = summary["setup"].get("speed") or {}
        lines += ["", f"Speed at about {cfg.get('context_tokens')} tokens: TTFT of one cold prompt alone; decode tokens/s of "
                  f"{sp['A']['batch']} requests over as many documents of that length decoding together ({sp['A']['max_tokens']} tokens each):", "",
                  "| arm | TTFT s | decode tok/s (batch) |", "|---|---|---|"]
        for side, label in (("A", la), ("B", lb)):
            lines.append(f"| {side}: {label} | {sp[side]['ttft_s']:.2f} | {sp[side]['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=130)  # logs and CI: keep the columns whole
    la, lb = summary["arms"]["A"]["label"], summary["arms"]["B"]["label"]
    t = Table(title=f"accuracy: A = {la}  vs  B = {lb}  (exact-match rate, 95% Wilson CI; McNemar p)")
    for col in ("task", "length", "n", "A", "B", "p"):
        t.add_column(col, justify="right" if col not in ("task",) else "left")

    def fmt(side, n):
        lo, hi = side["exact_ci"]
        return f"{side['exact'] / n:.2f} [{lo:.2f},{hi:.2f}]"

    for row in summary["accuracy"]["by_task_length"] + [{"task": "ALL", "length": "", **summary["accuracy"]["overall"]}]:
        t.add_row(row["task"], str(row["length"]), str(row["n"]), fmt(row["A"], row["n"]), fmt(row["B"], row["n"]),
                  f"{row['mcnemar']['p_value']:.3g}")
    console.print(t)
    console.print(machine_line(summary["setup"].get("machine")))
    lt = Table(title="latency under load (median [95% CI] of p50/p90/p99)")
    for col in ("arm", "TTFT p50 s", "TTFT p90 s", "TTFT p99 s", "TPOT p50 ms", "tok/s", "KV capacity at bf16 (tokens)"):
        lt.add_column(col, justify="right")
    for side, label in (("A", la), ("B", lb)):
        lat = summary["latency"][side]
        ttft = lat["ttft_s"] or {}
        tpot = (lat["tpot_s"] or {}).get("p50")
        lt.add_row(label, *(f"{ttft[f'p{q}']['value']:.2f} [{ttft[f'p{q}']['low']:.2f},{ttft[f'p{q}']['high']:.2f}]"
                             if ttft else "-" for q in PERCENTILES),
                   f"{tpot['value'] * 1e3:.1f}" if tpot else "-", f"{lat['tokens_per_s']:.1f}",
                   str(summary["kv_capacity_tokens"][side] or "n/a"))
    console.print(lt)
    sp = summary.get("speed") or {}
    if sp.get("A") and sp.get("B"):
        for side, label in (("A", la), ("B", lb)):
            console.print(f"speed {side} ({label}): TTFT {sp[side]['ttft_s']:.2f} s, decode {sp[side]['decode_tokens_per_s']:.1f} "
                          f"tok/s at batch {sp[side]['batch']}")
    console.print(f"[bold]verdict (B vs A): {summary['verdict']['line']}[/]")


def write_plots(summary: dict, out_dir: Path, prefix: str = "ab") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cells = [c for c in summary["accuracy"]["cells"] if c["task"] != "cwe"]  # cwe has no needle depth
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, side in zip(axes, ("A", "B")):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                vals = [c[side] for c in cells if c["depth"] == d and c["length"] == n]
                grid[i, j] = sum(vals) / len(vals) if vals else np.nan
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{side}: {summary['arms'][side]['label']}")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=axes, label="mean score (needle tasks)")
    path = out_dir / f"{prefix}_needle_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, unit, scale in ((axes[0], "ttft_s", "TTFT (s)", 1.0), (axes[1], "tpot_s", "TPOT (ms)", 1e3)):
        for side in ("A", "B"):
            vals = sorted(r[metric] * scale for r in summary["raw"][side]["load"]["requests"] if r[metric] is not None)
            if vals:
                ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post",
                        label=f"{side}: {summary['arms'][side]['label']}")
        ax.set_xlabel(unit)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("latency CDF under concurrent streaming load")
    path = out_dir / f"{prefix}_latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    written.append(_verdict_plot(summary, out_dir / f"{prefix}_verdict.png", plt, np))
    return written


def _verdict_plot(summary: dict, path: Path, plt, np) -> Path:
    """B's gains over A (KV capacity, decode at batch, TTFT) beside each cell's accuracy with its
    Wilson interval, under the verdict line."""
    v = summary["verdict"]
    la, lb = summary["arms"]["A"]["label"], summary["arms"]["B"]["label"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    names = [("KV capacity", v.get("kv_capacity_ratio")), (f"decode, batch {v.get('batch', '?')}", v.get("decode_ratio")),
             ("TTFT speed", v.get("ttft_speedup"))]
    names = [(n, x) for n, x in names if x]
    bars = left.bar([n for n, _ in names], [x for _, x in names], color="#4c72b0")
    left.axhline(1.0, color="black", lw=1)
    for b, (_, x) in zip(bars, names):
        left.text(b.get_x() + b.get_width() / 2, x, f"{x:.2f}x", ha="center", va="bottom")
    left.set_ylabel(f"{lb} over {la} (> 1: better)")
    left.set_title("capacity and speed")
    rows = summary["accuracy"]["by_task_length"] + [{"task": "all", "length": "", **summary["accuracy"]["overall"]}]
    x = np.arange(len(rows))
    for dx, side, label in ((-0.15, "A", la), (0.15, "B", lb)):
        acc = np.array([r[side]["exact"] / r["n"] for r in rows])
        lo = np.array([r[side]["exact_ci"][0] for r in rows])
        hi = np.array([r[side]["exact_ci"][1] for r in rows])
        right.errorbar(x + dx, acc, yerr=[acc - lo, hi - acc], fmt="o", capsize=4, label=f"{side}: {label}")
    right.set_xticks(x, [f"{r['task']} {r['length']}\nn={r['n']}" for r in rows])
    right.set_ylim(0, 1.05)
    right.set_ylabel("exact-match rate (95% Wilson)")
    right.set_title("accuracy, paired prompts")
    right.legend(loc="lower left")
    fig.suptitle(v["line"], fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(summary: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
