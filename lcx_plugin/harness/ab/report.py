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
    return {
        "setup": setup,
        "arms": {"A": a["arm"], "B": b["arm"]},
        "kv_capacity_tokens": {"A": a.get("kv_capacity_tokens"), "B": b.get("kv_capacity_tokens")},
        "accuracy": {
            "overall": _compare(pairs),
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
    lines = [f"{machine_line(summary['setup'].get('machine'))}", "",
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
    return written


def write_json(summary: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
