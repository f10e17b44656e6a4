"""Length extrapolation: stock against lcx's compacted positions at 4k-32k tokens, on the embedded model.

The model was trained to 8,192 positions. Passkey and multi-key needle accuracy at 4k, 8k, 16k and
32k tokens, stock and lcx with the same engine overrides, and decode speed at 32k.

    ./lcx bench extrapolation                      # every cell; resumes a stopped run
    ./lcx bench extrapolation --lengths 4096,8192  # some lengths only (the rest stay to do)
    ./lcx bench extrapolation --speed-only         # the decode-speed cells at 32k only

Arms, each a real vLLM engine with the machine's settings (``lcx machine``), both with
``hf_overrides={"max_position_embeddings": 36864}`` and ``max_model_len`` 36864 (what serving
past the trained length requires of stock too; inside 8k the override changes nothing):
- ``stock``: the platform's own attention at absolute positions;
- ``lcx``: ``token_select`` with ``"prefill": "select"`` and ``"extrapolate": true`` (each block of
  64 prompt rows and every decode step select 2,048 tokens by position-neutral soft-voted q·k, plus
  64 sinks and a 1,024-token window, read at compacted positions). ``--lcx-config`` replaces it.

Accuracy: for each task and length, 8 needle depths x 3 seeds = 24 prompts (seeds distinct from
the tests, the calibration and the other benchmarks), strict scoring (a listed distractor or any
other answer-shaped number makes the answer wrong). Targets (issue): lcx at 16k within 10 points
of its own 4k accuracy, at 32k within 20.

A cell (arm x length, both tasks) runs its prompts ``PART`` (8) at a time, one engine each; the
outputs so far are kept in the result file (``"partial"``, scored in ``summary["partial"]``) after
every part, and a cell is written as soon as its last part finishes. The prompts run seed by seed,
each seed's depths spread over its two parts and both tasks alternating (``run_order``), so a
stopped cell's parts are an unbiased sample: every two parts hold one prompt per task and depth.
A later run with the same machine line and config skips the cells already there and continues a
partial one:
a stock prefill at 32k costs minutes per prompt on a small CPU, so the whole grid may take several
runs. ``"complete"`` says whether every cell is in.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

LENGTHS = (4096, 8192, 16384, 32768)
TASKS = ("passkey", "multikey")
DEPTHS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.85, 0.95)
SEEDS_PER_DEPTH = 3
BASE_SEED = 23  # tests use 0-3, bench/streaming.py 7, calibration its own: distinct prompts
MAX_LEN = 36864  # the longest prompt (32768 + 5%) plus its answer
TRAINED = 8192
SPEED_TOKENS = 32000
SPEED_STEPS = 64  # generated tokens per timed run
LCX_CONFIG = {"method": "token_select", "prefill": "select", "extrapolate": True, "sink": 64, "window": 1024,
              "budget": 2048}
ARMS = ("stock", "lcx")
#: Prompts per engine run inside a cell: a stopped run keeps every finished part (a 16k prompt costs
#: the lcx arm minutes on 2 cores, so a whole cell is hours). Parts cost one engine start each.
PART = 8


def engine_overrides() -> dict:
    return {"max_model_len": MAX_LEN, "hf_overrides": {"max_position_embeddings": MAX_LEN},
            "enable_prefix_caching": False}


def samples_for(length: int, tokenizer) -> list:
    from lcx_plugin.harness.ab.tasks import derive_seed, generate

    return [generate(task, length, d, derive_seed(BASE_SEED, task, length, d, i), tokenizer)
            for task in TASKS for d in DEPTHS for i in range(SEEDS_PER_DEPTH)]


#: Depths in the order a seed runs them: each half of a seed spans the whole prompt.
SPREAD = (0.05, 0.6, 0.15, 0.75, 0.3, 0.85, 0.45, 0.95)


def run_order(samples) -> list[int]:
    """Indices into ``samples_for``'s list (task, then depth, then seed) in the order a cell runs
    them: seed by seed, depths in ``SPREAD`` order, the tasks alternating."""
    where = {(s.task, s.depth, k % SEEDS_PER_DEPTH): k for k, s in enumerate(samples)}
    return [where[(task, d, i)] for i in range(SEEDS_PER_DEPTH) for d in SPREAD for task in TASKS]


def arm_kwargs(arm: str, lcx_config: dict) -> dict:
    return {} if arm == "stock" else {"backend": "lcx", "lcx": lcx_config}


def _cell(arm: str, length: int, lcx_config: dict, samples, model: str, settings, log_dir: Path,
          partial: dict | None = None, save=None) -> dict:
    """Both tasks at one length: accuracy per task, by depth, and the outputs. The prompts run
    ``PART`` at a time, each part in a fresh engine, and ``save(partial)`` is called after each part
    with the outputs so far in run order (``partial``: ``{"texts", "prompt_tokens", "wall_s",
    "samples", "exact"}``, ``samples`` the indices ``run_order`` gave), so a stopped run loses at
    most one part; a ``partial`` from an earlier run is continued. The cell's outputs are in
    ``samples``' order."""
    from lcx_plugin.harness.ab.tasks import score
    from lcx_plugin.harness.batch import ArmSpec, run_arm

    order = run_order(samples)
    done = dict(partial or {"texts": [], "prompt_tokens": [], "wall_s": [], "samples": [], "exact": []})
    if done["samples"] != order[:len(done["samples"])]:
        raise SystemExit(f"{arm} {length}: the kept prompts are not this grid's run order; rerun the cell")
    while len(done["texts"]) < len(samples):
        index = order[len(done["texts"]): len(done["texts"]) + PART]
        part = [samples[k] for k in index]
        spec = ArmSpec(model=model, prompts=[s.prompt for s in part], max_tokens=max(s.max_tokens for s in part),
                       engine=engine_overrides(), **arm_kwargs(arm, lcx_config))
        r = run_arm(spec, log_path=str(log_dir / f"extrapolation_{arm}_{length}.log"), settings=settings,
                    timeout=12 * 3600)
        done = {"texts": done["texts"] + r["texts"], "prompt_tokens": done["prompt_tokens"] + r["prompt_tokens"],
                "wall_s": done["wall_s"] + [r["batch_s"]], "samples": done["samples"] + index,
                "exact": done["exact"] + [score(s, text).exact for s, text in zip(part, r["texts"])]}
        if save is not None and len(done["texts"]) < len(samples):
            save(done)
    back = sorted(range(len(order)), key=lambda j: order[j])  # run position of each sample
    done = {**done, **{key: [done[key][j] for j in back] for key in ("texts", "prompt_tokens", "exact")}}
    cell: dict = {"acc": {}, "n": {}, "by_depth": {}, "prompt_tokens": {}, "wall_s": sum(done["wall_s"]),
                  "prompts_per_engine": PART}
    for task in TASKS:
        rows = [(s, e, n) for s, e, n in zip(samples, done["exact"], done["prompt_tokens"]) if s.task == task]
        ok = [e for _, e, _ in rows]
        cell["acc"][task] = sum(ok) / len(ok)
        cell["n"][task] = len(ok)
        cell["by_depth"][task] = {str(d): sum(o for (s, _, _), o in zip(rows, ok) if s.depth == d) / SEEDS_PER_DEPTH
                                  for d in DEPTHS}
        cell["prompt_tokens"][task] = [min(n for _, _, n in rows), max(n for _, _, n in rows)]
    cell["outputs"] = done["texts"]
    return cell


def _speed(arm: str, lcx_config: dict, model: str, settings, log_dir: Path) -> dict:
    """One 32k prompt, prefilled once: decode tokens/s from runs that find it in the prefix cache
    (``batch._batch_timing``: medians of 3, the difference of a 1-token and a ``SPEED_STEPS``-token
    run, so no long prefill is inside the difference), and the time to first token as the first,
    uncached run less its decode steps at that rate."""
    from lcx_plugin.harness.batch import ArmSpec, run_arm
    from lcx_plugin.harness.prompts import long_prompt

    engine = {**engine_overrides(), "enable_prefix_caching": True}
    r = run_arm(ArmSpec(model=model, prompts=[long_prompt(SPEED_TOKENS, seed=11)], max_tokens=SPEED_STEPS,
                        batch_timing=True, repeats=3, engine=engine, **arm_kwargs(arm, lcx_config)),
                log_path=str(log_dir / f"extrapolation_speed_{arm}.log"), settings=settings, timeout=4 * 3600)
    timing = r["batch_timing"]
    decode_s = (SPEED_STEPS - 1) / timing["decode_tps"]
    return {"prompt_tokens": r["prompt_tokens"][0], "ttft_s": r["batch_s"] - decode_s, "decode_tps": timing["decode_tps"],
            "first_run_s": r["batch_s"], "steps": SPEED_STEPS, "cached_runs": timing}


def _load(out: Path, line: str, lcx_config: dict, fresh: bool) -> dict:
    """The result file to continue, or a new one; a file from another machine line or config is
    not mixed with this run."""
    new = {"lengths": list(LENGTHS), "tasks": list(TASKS), "stock": {}, "lcx": {}, "machine_line": line,
           "config": {"lcx": lcx_config, "engine": engine_overrides(), "trained_length": TRAINED,
                      "depths": list(DEPTHS), "seeds_per_depth": SEEDS_PER_DEPTH, "base_seed": BASE_SEED,
                      "scoring": "strict: the answer-shaped tokens of the output are exactly the answer"}}
    if fresh or not out.exists():
        return new
    try:
        old = json.loads(out.read_text())
    except ValueError as e:
        raise SystemExit(f"{out}: not a result file ({e}); move it away or pass --fresh") from None
    if old.get("machine_line") != line or old.get("config") != new["config"]:
        raise SystemExit(f"{out} was measured on {old.get('machine_line')!r} with {old.get('config')}; this run is "
                         f"{line!r} with {new['config']}: pass --fresh to start over (or --out elsewhere)")
    return old


def _summary(result: dict) -> dict:
    """Accuracy by arm, task and length (both tasks pooled under "all"), and the targets' verdicts."""
    out: dict = {}
    for arm in ARMS:
        out[arm] = {}
        for length, cell in sorted(result[arm].items(), key=lambda kv: int(kv[0])):
            if length == "speed":
                continue
            n = sum(cell["n"].values())
            out[arm][length] = {**cell["acc"], "all": sum(cell["acc"][t] * cell["n"][t] for t in cell["n"]) / n}
    partial = {arm: {length: _partial_acc(kept) for length, kept in cells.items()}
               for arm, cells in result.get("partial", {}).items()}
    if partial:
        out["partial"] = partial
    lcx = out["lcx"]
    base = lcx.get("4096", {}).get("all")
    out["targets"] = {
        f"lcx {n} within {pts} points of lcx 4k": (None if base is None or n not in lcx else lcx[n]["all"] >= base - pts / 100)
        for n, pts in (("16384", 10), ("32768", 20))}
    if "speed" in result["stock"] and "speed" in result["lcx"]:
        out["decode_tps_ratio_32k"] = result["lcx"]["speed"]["decode_tps"] / result["stock"]["speed"]["decode_tps"]
        out["ttft_ratio_32k"] = result["lcx"]["speed"]["ttft_s"] / result["stock"]["speed"]["ttft_s"]
    return out


def _partial_acc(kept: dict) -> dict:
    """Accuracy per task of an unfinished cell's kept prompts, and how many of each."""
    per_task = len(DEPTHS) * SEEDS_PER_DEPTH
    acc: dict = {"n": {}}
    for t, task in enumerate(TASKS):
        ok = [e for k, e in zip(kept["samples"], kept["exact"]) if k // per_task == t]
        acc["n"][task] = len(ok)
        acc[task] = sum(ok) / len(ok) if ok else None
    return acc


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = _summary(result)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(10, 3.6), constrained_layout=True, sharey=True)
    for ax, task in zip(axes, TASKS):
        for arm, mark in (("stock", "x"), ("lcx", "o")):
            cells = summary[arm]
            xs = [int(n) for n in cells]
            line, = ax.plot(xs, [cells[n][task] for n in cells], marker=mark, label=arm)
            for n, kept in summary.get("partial", {}).get(arm, {}).items():  # unfinished cells: open markers
                if kept[task] is not None:
                    ax.plot([int(n)], [kept[task]], marker=mark, ls="", mfc="none", color=line.get_color())
                    ax.annotate(f"{arm} so far, n={kept['n'][task]}", (int(n), kept[task]), fontsize=6,
                                xytext=(4, 4), textcoords="offset points", color=line.get_color())
        ax.axvline(TRAINED, color="grey", ls=":", lw=1)
        ax.text(TRAINED, 1.02, " trained length", fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(LENGTHS), [f"{n // 1024}k" for n in LENGTHS])
        ax.set_xlabel(f"prompt tokens (n={len(DEPTHS) * SEEDS_PER_DEPTH} per point)")
        ax.set_title(task, fontsize=9)
        ax.set_ylim(-0.05, 1.08)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy (strict)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"length extrapolation on SmolLM2-135M (trained 8k); lcx: {json.dumps(result['config']['lcx'])}\n"
                 f"{result['machine_line']}", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_run(result: dict, lengths: list[int], arms: list[str], speed: str = "with") -> tuple[list, list]:
    """``(accuracy cells, speed arms)`` not yet in ``result``: the speed cells come ``"with"`` the
    accuracy cells when 32k is asked, are skipped (``"skip"``), or run alone (``"only"``)."""
    cells = [] if speed == "only" else [(arm, n) for n in lengths for arm in arms if str(n) not in result[arm]]
    wanted = speed == "only" or (speed == "with" and LENGTHS[-1] in lengths)
    return cells, [a for a in arms if wanted and "speed" not in result[a]]


def _ints(text: str, allowed: tuple[int, ...], flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: comma-separated integers from {list(allowed)}, got {text!r}") from None
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SystemExit(f"{flag}: {bad or text!r} not among {list(allowed)}")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/extrapolation.json")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated subset of the lengths")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of stock,lcx")
    speed = ap.add_mutually_exclusive_group()
    speed.add_argument("--no-speed", action="store_true", help="skip the decode-speed cells at 32k")
    speed.add_argument("--speed-only", action="store_true", help="run only the decode-speed cells at 32k")
    ap.add_argument("--lcx-config", default=None, help="JSON lcx config instead of the default token_select one")
    ap.add_argument("--fresh", action="store_true", help="start over instead of continuing --out")
    args = ap.parse_args()
    lengths = _ints(args.lengths, LENGTHS, "--lengths")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS):
        raise SystemExit(f"--arms: choose from {list(ARMS)}, got {args.arms!r}")
    try:
        lcx_config = LCX_CONFIG if args.lcx_config is None else json.loads(args.lcx_config)
    except ValueError as e:
        raise SystemExit(f"--lcx-config: not JSON ({e})") from None

    import os

    from transformers import AutoTokenizer

    from lcx_plugin.harness.ab.report import machine_line
    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.progress import Progress
    from lcx_plugin.harness.settings import choose, machine_record
    from lcx_plugin.machine import cpu_info

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # room for a few 36k-token sequences at float32
    settings = choose()
    print(settings.line(cpu_info()), flush=True)
    model = str(prepare())
    log_dir = Path("out/logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = _load(out, machine_line(machine_record(settings)), lcx_config, args.fresh)
    tokenizer = AutoTokenizer.from_pretrained(model)
    todo, speed = to_run(result, lengths, arms, "skip" if args.no_speed else "only" if args.speed_only else "with")
    print(f"{out}: to run {todo + [(a, 'speed') for a in speed] or 'nothing'}", flush=True)
    for arm, n in todo:
        kept = _kept(result, arm, n)
        if kept:
            print(f"{arm} {n}: continuing after the {len(kept['texts'])} prompts kept from an earlier run", flush=True)
    with Progress(len(todo) + len(speed), "bench extrapolation") as progress:
        for arm, n in todo:
            def save(done, arm=arm, n=n):
                _keep(result, arm, n, done)
                _write(result, out)
                print(f"{arm} {n}: {len(done['texts'])} prompts done, kept in {out}", flush=True)

            result[arm][str(n)] = _cell(arm, n, lcx_config, samples_for(n, tokenizer), model, settings, log_dir,
                                        _kept(result, arm, n), save)
            _keep(result, arm, n, None)
            _write(result, out)
            progress.advance(note=f"{arm} {n}: {result[arm][str(n)]['acc']}")
        for arm in speed:
            result[arm]["speed"] = _speed(arm, lcx_config, model, settings, log_dir)
            _write(result, out)
            progress.advance(note=f"{arm} speed at 32k: {result[arm]['speed']}")
    _write(result, out)
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"written: {out}" + ("" if result["complete"] else " (not every cell yet: run again to continue)"))
    return 0


def _kept(result: dict, arm: str, length: int) -> dict | None:
    """The outputs an earlier run kept of an unfinished cell (``_cell``'s ``partial``), if any."""
    return result.get("partial", {}).get(arm, {}).get(str(length))


def _keep(result: dict, arm: str, length: int, done: dict | None) -> None:
    """Keep an unfinished cell's outputs so far under ``result["partial"]``; None drops them (the
    cell is in), and an empty ``"partial"`` leaves the file."""
    partial = result.setdefault("partial", {})
    if done is None:
        partial.get(arm, {}).pop(str(length), None)
    else:
        partial.setdefault(arm, {})[str(length)] = done
    for a in [a for a, cells in partial.items() if not cells]:
        partial.pop(a)
    if not partial:
        result.pop("partial")


def _write(result: dict, out: Path) -> None:
    result["summary"] = _summary(result)
    result["complete"] = all(str(n) in result[a] for a in ARMS for n in LENGTHS) and all("speed" in result[a]
                                                                                         for a in ARMS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
