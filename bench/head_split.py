"""Head split (retrieval heads full, streaming heads sinks + window) on the embedded model: accuracy
against the engine's own KV capacity, in one run.

    ./lcx bench head_split          # writes bench/results/head_split.json and .png

Arms, each a real vLLM engine with the machine's settings (``lcx machine``):
- stock (capacity and speed baseline) and dense lcx (accuracy baseline);
- ``streaming``: every head keeps sinks + window (the same sink and window as the split);
- ``head_split`` with the shipped calibrated pattern at streaming fractions 1/3 and 2/3, and with a
  random pattern of the same sparsity (seeded), which shows what calibration is worth.

Accuracy: passkey prompts at about 1k, 3k and 7k tokens, 8 needle depths x 3 seeds = 24 per length
(the same prompts as ``bench/streaming.py``; seeds distinct from the tests and from calibration),
strict scoring (the output's 5-digit numbers must be exactly the pass key; the filler carries
same-shaped distractors). Capacity: the KV tokens the engine reports for the same memory, at
bf16, against stock's. Speed: TTFT and decode tokens/s on one ~7k-token prompt against stock.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from streaming import DEPTHS, LENGTHS, SEEDS_PER_DEPTH, _accuracy, _accuracy_prompts  # noqa: E402

SINK, WINDOW = 64, 256
FRACTIONS = (1 / 3, 2 / 3)
RANDOM_SEED = 0


def _configs(random_path: str) -> list[tuple[str, dict, dict]]:
    """(arm name, lcx config, the record's fields) for every compressed arm."""
    out = [("streaming-all", {"method": "streaming", "sink": SINK, "window": WINDOW},
            {"pattern": "streaming-all", "streaming_fraction": 1.0})]
    for f in FRACTIONS:
        for pattern, path in (("calibrated", "auto"), ("random", random_path)):
            cfg = {"method": "head_split", "pattern": path, "streaming_fraction": round(f, 4), "sink": SINK,
                   "window": WINDOW}
            out.append((f"{pattern}-{f:.2f}", cfg, {"pattern": pattern, "streaming_fraction": round(f, 4)}))
    return out


def _speed(name: str, arm_kwargs: dict, model: str, settings, log_dir: Path) -> dict:
    from lcx_plugin.harness.batch import ArmSpec, run_arm
    from lcx_plugin.harness.prompts import long_prompt

    r = run_arm(ArmSpec(model=model, prompts=[long_prompt(7000, seed=11)], max_tokens=64, timing=True, repeats=2,
                        engine={"enable_prefix_caching": False}, **arm_kwargs),
                log_path=str(log_dir / f"head_split_speed_{name}.log"), settings=settings)
    return {"prompt_tokens": r["prompt_tokens"][0], "ttft_s": r["ttft_s"][0], "decode_tps": r["decode_tps"][0],
            "kv_tokens": r["kv_capacity"]["tokens_bf16"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    marks = {"calibrated": "o", "random": "x", "streaming-all": "s"}
    ax = axes[0]
    ax.scatter([1.0], [result["dense_acc"]], marker="*", s=120, label="dense", color="black")
    for r in result["runs"]:
        ax.scatter([r["capacity_ratio"]], [r["acc"]], marker=marks[r["pattern"]], s=60,
                   label=f"{r['pattern']} {r['streaming_fraction']:.2f}")
    ax.set_xlabel("engine KV capacity / stock (same memory)")
    ax.set_ylabel("passkey exact-match (all lengths)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    arms = [("dense", result["dense"]["acc"])] + [(f"{r['pattern']} {r['streaming_fraction']:.2f}", r["acc_by_length"])
                                                  for r in result["runs"]]
    width = 0.8 / len(arms)
    for i, (label, acc) in enumerate(arms):
        ax.bar([j + i * width for j in range(len(LENGTHS))], [acc[str(n)] for n in LENGTHS], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(LENGTHS))], [f"~{n}" for n in LENGTHS])
    ax.set_xlabel(f"prompt tokens (n={len(DEPTHS) * SEEDS_PER_DEPTH} each)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6)
    fig.suptitle(f"head split (sink {SINK}, window {WINDOW}) on SmolLM2-135M; {result['machine_line']}", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/head_split.json")
    names = [n for n, _, _ in _configs("random")]
    ap.add_argument("--arms", default=None,
                    help=f"comma-separated subset of the compressed arms ({', '.join(names)}); stock and dense always "
                         "run. Default: every arm")
    ap.add_argument("--resume", action="store_true",
                    help="continue a stopped run in --out: keep its dense accuracy and finished arms when the machine "
                         "line and the shipped pattern are the same, re-measure stock's speed, run the arms it lacks")
    args = ap.parse_args()
    wanted = names if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown or not wanted:
        ap.error(f"--arms: unknown arm(s) {unknown or args.arms!r}; choose from {', '.join(names)}")

    from transformers import AutoTokenizer

    from lcx_plugin.head_patterns import random_pattern
    from lcx_plugin.harness.ab.report import machine_line
    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import choose, machine_record
    from lcx_plugin.machine import cpu_info
    from lcx_plugin.selectors import get

    settings = choose()
    print(settings.line(cpu_info()), flush=True)
    model = str(prepare())
    log_dir = Path("out/logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_record(settings)
    shipped = get("head_split")().load_pattern(_shape(model))
    tmp = tempfile.mkdtemp(prefix="lcx-bench-")
    random_path = str(random_pattern(shipped.model, RANDOM_SEED).save(Path(tmp) / "random.json"))
    by_name = {c[0]: c for c in _configs(random_path)}
    configs = [by_name[n] for n in wanted]  # in the order asked for
    samples = _accuracy_prompts(AutoTokenizer.from_pretrained(model))
    result: dict = {"machine": machine, "machine_line": machine_line(machine)}
    all_arms = list(wanted)  # what the file's setup lists: a resumed run's finished arms too
    if args.resume:
        result = _resumable(Path(args.out), result["machine_line"], shipped)
        done = {_arm_name(r) for r in result["runs"]}
        configs = [c for c in configs if c[0] not in done]
        all_arms = [n for n in names if n in done or n in wanted]
        print(f"resuming {args.out}: kept dense and {sorted(done) or 'no arms'}; to run: "
              f"{[c[0] for c in configs] or 'nothing'}", flush=True)
    with Progress((1 if args.resume else 2) + 2 * len(configs), "bench head_split") as progress:
        stock_speed = _speed("stock", {}, model, settings, log_dir)
        if args.resume and stock_speed["kv_tokens"] != result["stock_kv_tokens"]:
            raise SystemExit(f"--resume: stock now reports {stock_speed['kv_tokens']} KV tokens, the stopped run "
                             f"{result['stock_kv_tokens']}: not the same engine setup; run without --resume")
        result["stock_kv_tokens"] = stock_speed["kv_tokens"]
        progress.advance(note=f"stock: {stock_speed}")
        if not args.resume:
            dense = _accuracy("hs_dense", {"backend": "lcx", "lcx": {"method": "dense"}}, samples, model, settings,
                              log_dir)
            result["dense"] = dense
            result["dense_acc"] = _overall(dense)
            progress.advance(note=f"dense {dense['acc']}")
            result["runs"] = []
        _write(result, stock_speed, all_arms, shipped, Path(args.out), complete=False)
        for name, cfg, record in configs:
            arm = {"backend": "lcx", "lcx": cfg}
            acc = _accuracy(f"hs_{name}", arm, samples, model, settings, log_dir)
            progress.advance(note=f"{name}: {acc['acc']}")
            speed = _speed(name, arm, model, settings, log_dir)
            progress.advance(note=f"{name}: {speed}")
            result["runs"].append({
                **record, "kv_tokens": speed["kv_tokens"], "capacity_ratio": speed["kv_tokens"] / result["stock_kv_tokens"],
                "acc": _overall(acc), "acc_by_length": acc["acc"], "by_depth": acc["by_depth"],
                "decode_tps_ratio": speed["decode_tps"] / stock_speed["decode_tps"],
                "ttft_ratio": speed["ttft_s"] / stock_speed["ttft_s"], "stock_speed_7k": stock_speed,
                "config": cfg, "outputs": acc["outputs"]})
            _write(result, stock_speed, all_arms, shipped, Path(args.out), complete=False)
    out = _write(result, stock_speed, all_arms, shipped, Path(args.out), complete=True)
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"stock_kv_tokens": result["stock_kv_tokens"], "dense_acc": result["dense_acc"],
                      "runs": [{k: r[k] for k in ("pattern", "streaming_fraction", "capacity_ratio", "acc",
                                                  "decode_tps_ratio", "ttft_ratio")} for r in result["runs"]]}, indent=1))
    print(f"written: {out}")
    return 0


def _arm_name(run: dict) -> str:
    return "streaming-all" if run["pattern"] == "streaming-all" else f"{run['pattern']}-{run['streaming_fraction']:.2f}"


def _resumable(out: Path, line: str, shipped) -> dict:
    """The stopped run in ``out``, when it was measured on this machine line with this pattern."""
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--resume: cannot read {out}: {e}") from None
    if result.get("machine_line") != line:
        raise SystemExit(f"--resume: {out} was measured on {result.get('machine_line')!r}, this is {line!r}; "
                         "accuracy and speed ratios would mix machines: run without --resume")
    if result.get("setup", {}).get("pattern_source") != shipped.source:
        raise SystemExit(f"--resume: {out} used another shipped pattern ({result.get('setup', {}).get('pattern_source')}); "
                         "run without --resume")
    if "dense" not in result or "runs" not in result:
        raise SystemExit(f"--resume: {out} has no dense accuracy yet; run without --resume")
    for run in result["runs"]:  # the stock speed a finished arm's ratios were taken against
        run.setdefault("stock_speed_7k", result.get("speed_stock_7k"))
    return result


def _write(result: dict, stock_speed: dict, arms: list[str], shipped, out: Path, complete: bool) -> Path:
    """The result so far (after every arm, so a long run that is stopped keeps what it measured). Every
    run keeps the stock speed its ratios were taken against (a resumed run re-measures it)."""
    result["speed_stock_7k"] = stock_speed
    result["complete"] = complete
    result["setup"] = {"arms": arms, "lengths": LENGTHS, "depths": DEPTHS,
                       "seeds_per_depth": SEEDS_PER_DEPTH, "sink": SINK,
                       "window": WINDOW, "random_seed": RANDOM_SEED, "pattern": shipped.path,
                       "pattern_source": shipped.source,
                       "scoring": "strict: the output's 5-digit numbers are exactly the pass key",
                       "capacity": "engine-reported KV tokens at bf16 for the same VLLM_CPU_KVCACHE_SPACE, max_model_len 8192, "
                                   "default max_num_batched_tokens"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out


def _overall(acc: dict) -> float:
    n = sum(acc["n"].values())
    return sum(acc["acc"][k] * acc["n"][k] for k in acc["n"]) / n


def _shape(model: str):
    from transformers import AutoConfig

    from lcx_plugin.head_patterns import ModelShape

    c = AutoConfig.from_pretrained(model)
    return ModelShape(c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
                      Path(model).name)


if __name__ == "__main__":
    raise SystemExit(main())
