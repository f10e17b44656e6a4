"""Shared-context tasks (``lcx ab``'s ``multiturn`` and ``sharedctx``) for stock and every method.

    ./lcx bench shared_context                 # 24 contexts per task at 1,024 tokens; bench/results/shared_context.{json,png}
    ./lcx bench shared_context --contexts 4 --rows stock,streaming   # a quick look

One in-process engine per row (prefix caching on, as vLLM's default), the same prompts for every
row (``lcx_plugin/harness/ab/shared_context.py``): a context with six facts, four of them asked.
``multiturn``: each turn's prompt extends the previous turn's with its gold answer, so later turns
run on cached KV; ``sharedctx``: the four questions as four requests over the same context. Strict
scoring (any other fact's value is wrong). Every method row is paired with stock
(``lcx ab``'s report: exact rates, McNemar p) per task and turn. Each method keeps about a quarter
of a 1,024-token context (``CONFIGS``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CONFIGS = {
    "dense": {"method": "dense"},
    "streaming": {"method": "streaming", "sink": 64, "window": 192},
    "head_split": {"method": "head_split", "streaming_fraction": 0.5, "sink": 64, "window": 192},
    "token_select": {"method": "token_select", "sink": 32, "window": 96, "budget": 128},
    "hip": {"method": "hip", "sink": 32, "window": 96, "budget": 128, "dense_layers": [0]},
}


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, task in zip(axes, ("multiturn", "sharedctx")):
        for row, per in res["accuracy"].items():
            turns = per[task]
            ax.plot([t + 1 for t in range(len(turns))], turns, marker="o", label=row,
                    linestyle="--" if row == "stock" else "-")
        ax.set_title(f"{task} ({res['length']} tokens, n={res['contexts']} per turn)")
        ax.set_xlabel("question (turn)")
        ax.set_xticks(range(1, len(turns) + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact accuracy (strict)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from reliability import _commit

    from lcx_plugin.harness.ab.arms import Arm, Job, run_engine_arm
    from lcx_plugin.harness.ab.report import summarize
    from lcx_plugin.harness.ab.shared_context import QUESTIONS
    from lcx_plugin.harness.ab.tasks import build_grid
    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.settings import choose, machine_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, default=24, help="contexts (conversations) per task")
    ap.add_argument("--length", type=int, default=1024, help="context tokens of the first prompt")
    ap.add_argument("--rows", default=None, help="comma-separated subset of: stock," + ",".join(CONFIGS))
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (a conversation's turns in order)")
    ap.add_argument("--out", default="bench/results/shared_context.json")
    args = ap.parse_args()
    rows = ["stock", *CONFIGS] if args.rows is None else args.rows.split(",")
    if rows[0] != "stock" or any(r not in CONFIGS for r in rows[1:]):
        ap.error(f"--rows must start with stock, then any of {list(CONFIGS)}")
    t0 = time.time()
    model = str(prepare())
    settings = choose()
    tok = AutoTokenizer.from_pretrained(model)
    samples = build_grid(["multiturn", "sharedctx"], [args.length], [0.5], args.contexts, 0, tok, max_context=8192)
    log_dir = Path("out/logs/shared_context")
    log_dir.mkdir(parents=True, exist_ok=True)
    from dataclasses import asdict

    job = Job(samples=samples, load_prompts=[], load_max_tokens=1, load_concurrency=1,
              accuracy_concurrency=args.concurrency, model=model, engine={"max_model_len": 8192},
              settings=asdict(settings))
    results = {}
    for row in rows:
        arm = Arm("stock", "engine") if row == "stock" else Arm(row, "engine", "lcx", CONFIGS[row])
        print(f"bench shared_context: {row} ({len(samples)} requests)", file=sys.stderr, flush=True)
        results[row] = {"arm": asdict(arm), **run_engine_arm(arm, job, log_dir / f"{row}.log")}
    accuracy, paired = {}, {}
    for row in rows:
        per = {}
        for task in ("multiturn", "sharedctx"):
            per[task] = []
            for turn in range(QUESTIONS):
                hits = [r["exact"] for r in results[row]["samples"] if r["task"] == task and r["turn"] == turn]
                per[task].append(sum(hits) / len(hits))
        accuracy[row] = per
        if row != "stock":
            s = summarize(results["stock"], results[row], {})["accuracy"]
            paired[row] = [{k: v for k, v in t.items() if k in ("task", "turn", "n", "A", "B", "mcnemar")}
                           for t in s["by_turn"]]
    res = {"machine": machine_record(settings), "commit": _commit(), "length": args.length, "contexts": args.contexts,
           "questions": QUESTIONS, "configs": {r: CONFIGS.get(r) for r in rows}, "accuracy": accuracy,
           "paired_with_stock": paired, "kv_capacity_tokens": {r: results[r].get("kv_capacity_tokens") for r in rows},
           "raw": {r: results[r]["samples"] for r in rows}, "wall_s": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    _plot(res, out.with_suffix(".png"))
    for row in rows:
        print(row, {t: [round(x, 2) for x in v] for t, v in accuracy[row].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
