"""``lcx ab``: A/B test two arms on generated long-context tasks and a streaming load phase."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

from .arms import Arm, ArmSpecError, Job, run_arm
from .tasks import KNOWN_TASKS, TASKS, build_grid, generate

DEFAULTS = {
    "tasks": ",".join(TASKS), "lengths": "1024,4096", "depths": "0.1,0.5,0.9", "samples": 1,
    "load_requests": 16, "load_concurrency": 4, "load_prompt_tokens": 1024, "load_max_tokens": 32,
    "max_model_len": 8192, "speed_context": 0, "speed_batch": 8, "speed_max_tokens": 64,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arm-a", default="stock", help="'stock', 'lcx[:CONFIG-JSON-or-file]' or an http(s):// URL")
    p.add_argument("--arm-b", default="lcx", help="same forms as --arm-a")
    p.add_argument("--model", default=None, help="model dir for engine arms (default: the embedded SmolLM2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer used to fit prompts (default: --model)")
    p.add_argument("--tasks", default=DEFAULTS["tasks"], help=f"comma list of {list(KNOWN_TASKS)} (default: the first {len(TASKS)}; multiturn and "
                   "sharedctx ask several questions over one prefix-cached context)")
    p.add_argument("--lengths", default=DEFAULTS["lengths"], help="context lengths in tokens, comma list")
    p.add_argument("--depths", default=DEFAULTS["depths"], help="needle depths in [0,1], comma list")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="samples per (task, length, depth) cell")
    p.add_argument("--seed", type=int, default=0, help="one seed makes every prompt of the run")
    p.add_argument("--accuracy-concurrency", type=int, default=2,
                   help="accuracy requests in flight at once (1: each request scheduled alone, reproducible)")
    p.add_argument("--load-requests", type=int, default=DEFAULTS["load_requests"], help="requests in the load phase")
    p.add_argument("--load-concurrency", type=int, default=DEFAULTS["load_concurrency"],
                   help="streaming requests in flight at once during the load phase")
    p.add_argument("--load-prompt-tokens", type=int, default=DEFAULTS["load_prompt_tokens"])
    p.add_argument("--load-max-tokens", type=int, default=DEFAULTS["load_max_tokens"])
    p.add_argument("--speed-context", type=int, default=DEFAULTS["speed_context"],
                   help="speed phase at this context length in tokens: TTFT of one cold prompt, then decode tokens/s "
                        "of --speed-batch requests over as many documents of that length (0: no speed phase)")
    p.add_argument("--speed-batch", type=int, default=DEFAULTS["speed_batch"], help="requests decoding together in "
                   "the speed phase")
    p.add_argument("--speed-max-tokens", type=int, default=DEFAULTS["speed_max_tokens"],
                   help="tokens each speed-phase request decodes (end of text ignored)")
    p.add_argument("--max-model-len", type=int, default=DEFAULTS["max_model_len"],
                   help="the arms' context limit: lengths that cannot fit are refused up front")
    p.add_argument("--out", default="out/ab/ab.json", help="report JSON; the PNGs go beside it")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arms, the grid and the length limits, print the plan, start nothing")
    p.add_argument("--bind", default=None, help="engine arms: VLLM_CPU_OMP_THREADS_BIND for both arms "
                   "(default: every core; or $LCX_CPU_BIND)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="engine arms: model dtype for both arms (default: bfloat16 where the CPU runs it natively, "
                        "else float32; or $LCX_DTYPE)")


def _csv(text: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ArmSpecError(f"bad list {text!r}: {e}") from None


def _dry_run(args, arms, tasks, lengths, depths, console) -> int:
    """Everything that can be checked without an engine, an endpoint or a tokenizer."""
    from .tasks import _check_lengths_fit

    try:
        for task in tasks:
            if task not in KNOWN_TASKS:
                raise ValueError(f"unknown task {task!r}; expected one of {KNOWN_TASKS}")
        if any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths {depths} must lie in [0, 1]")
        _check_lengths_fit(tasks, lengths, args.max_model_len)
    except ValueError as e:
        console.print(f"[red]lcx ab: error:[/] {e}")
        return 2
    from .shared_context import QUESTIONS
    from .tasks import SHARED_CONTEXT_TASKS

    per_length = [QUESTIONS if t in SHARED_CONTEXT_TASKS else len(depths) for t in tasks]
    n = sum(per_length) * len(lengths) * args.samples
    speed = (f"; speed phase at {args.speed_context} tokens, batch {args.speed_batch}" if args.speed_context else "")
    console.print(f"dry run: arms A={arms[0].label} ({arms[0].kind}), B={arms[1].label} ({arms[1].kind}); "
                  f"{n} accuracy prompts, {args.load_requests} load requests{speed}; lengths {lengths} fit "
                  f"max_model_len {args.max_model_len}; report {args.out}")
    return 0


def _check_speed(args) -> None:
    if args.speed_context < 0 or args.speed_batch < 1 or args.speed_max_tokens < 2:
        raise ValueError(f"--speed-context {args.speed_context} must be >= 0, --speed-batch {args.speed_batch} >= 1 "
                         f"and --speed-max-tokens {args.speed_max_tokens} >= 2")
    if args.speed_context and args.speed_context + args.speed_max_tokens + 64 > args.max_model_len:
        raise ValueError(f"--speed-context {args.speed_context} plus {args.speed_max_tokens} new tokens does not fit "
                         f"--max-model-len {args.max_model_len}")


def speed_prompts(context_tokens: int, batch: int, seed: int, tokenizer) -> tuple[str, list[str]]:
    """The TTFT prompt, a passkey document of about ``context_tokens`` tokens, and the ``batch``
    prompts that decode together: that one and ``batch - 1`` other documents of the same length,
    so no two requests share pages (a shared prefix would flatter the arm that can share it)."""
    docs = [generate("passkey", context_tokens, 0.5, seed + 2000 + i, tokenizer).prompt for i in range(batch)]
    return docs[0], docs


class EndpointTokenizer:
    """Counts tokens with an OpenAI-compatible vLLM server's own ``/tokenize`` route, so that prompts
    for endpoint arms are fitted with the served model's tokenizer, not a local stand-in."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.model = self._json("/v1/models")["data"][0]["id"]

    def _json(self, path: str, payload: dict | None = None) -> dict:
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.base + path, data=None if payload is None else json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ArmSpecError(f"{self.base}{path} did not answer ({e}); pass --tokenizer with a local copy of the "
                               "served model's tokenizer") from None

    def encode(self, text: str) -> list[int]:
        return self._json("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": True})["tokens"]


def _tokenizer(args, arms: list[Arm], model: str | None, console):
    if args.tokenizer or model:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer or model)
    url = next(a.url for a in arms if a.kind == "endpoint")
    tok = EndpointTokenizer(url)
    console.print(f"fitting prompts with {url}'s own tokenizer (/tokenize, model {tok.model}); "
                  "pass --tokenizer to use a local one")
    return tok


def run(args: argparse.Namespace, finish=None) -> int:
    """``finish(summary) -> str``, if given, adds to the summary before it is written and returns
    Markdown to append to the report."""
    from rich.console import Console

    from lcx_plugin.harness.model import prepare
    from lcx_plugin.machine import cpu_info

    from ..settings import choose, machine_record
    from .report import markdown, print_table, summarize, write_json, write_plots

    console = Console(stderr=True)
    try:
        arms = [Arm.parse(args.arm_a), Arm.parse(args.arm_b)]
        tasks, lengths, depths = _csv(args.tasks), _csv(args.lengths, int), _csv(args.depths, float)
        settings = choose(bind=args.bind, dtype=args.dtype)
        _check_speed(args)
    except ValueError as e:
        console.print(f"[red]lcx ab: error:[/] {e}")
        return 2
    engine_arms = any(a.kind == "engine" for a in arms)
    if engine_arms:
        console.print(settings.line(cpu_info()))
    if args.dry_run:
        return _dry_run(args, arms, tasks, lengths, depths, console)
    model = args.model or (str(prepare()) if engine_arms else None)
    try:
        tokenizer = _tokenizer(args, arms, model, console)
    except ArmSpecError as e:
        console.print(f"[red]lcx ab: error:[/] {e}")
        return 2
    t0 = time.perf_counter()
    with console.status("generating tasks"):
        try:
            samples = build_grid(tasks, lengths, depths, args.samples, args.seed, tokenizer, max_context=args.max_model_len)
            load_prompts = [generate("passkey", args.load_prompt_tokens, 0.5, args.seed + 1000 + i, tokenizer).prompt
                            for i in range(args.load_requests)]
            speed = speed_prompts(args.speed_context, args.speed_batch, args.seed, tokenizer) if args.speed_context else None
        except ValueError as e:
            console.print(f"[red]lcx ab: error:[/] {e}")
            return 2
    console.print(f"{len(samples)} accuracy prompts ({len(tasks)} tasks x {len(lengths)} lengths x {len(depths)} depths"
                  f" x {args.samples}), {len(load_prompts)} load requests at concurrency {args.load_concurrency}")
    job = Job(samples=samples, load_prompts=load_prompts, load_max_tokens=args.load_max_tokens,
              load_concurrency=args.load_concurrency, accuracy_concurrency=args.accuracy_concurrency, model=model,
              engine={"max_model_len": args.max_model_len}, settings=asdict(settings),
              speed_ttft_prompt=speed[0] if speed else None, speed_batch_prompts=speed[1] if speed else [],
              speed_max_tokens=args.speed_max_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(os.environ.get("LCX_LOG_DIR", "out/logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for side, arm in zip("AB", arms):
        console.rule(f"arm {side}: {arm.label} ({arm.kind})")
        results.append(run_arm(arm, job, log_dir / f"{out.stem}_arm{side}.log"))
    setup = {"tasks": tasks, "lengths": lengths, "depths": depths, "samples_per_cell": args.samples, "seed": args.seed,
             "model": model, "load": {"requests": args.load_requests, "concurrency": args.load_concurrency,
                                      "prompt_tokens": args.load_prompt_tokens, "max_tokens": args.load_max_tokens},
             "speed": {"context_tokens": args.speed_context, "batch": args.speed_batch,
                       "max_tokens": args.speed_max_tokens} if speed else None,
             "engine": job.engine, "machine": machine_record(settings) if engine_arms else None,
             "scoring": "exact: the answer-shaped items in the output are exactly the expected set (a distractor "
                        "named is wrong); partial: fraction of expected answers found",
             "wall_s": None}
    summary = summarize(results[0], results[1], setup)
    summary["setup"]["wall_s"] = time.perf_counter() - t0
    extra_md = finish(summary) if finish else ""
    print_table(summary)
    write_json(summary, out)
    out.with_suffix(".md").write_text(markdown(summary) + "\n" + extra_md)
    pngs = write_plots(summary, out.parent, prefix=out.stem)
    console.print(f"report: {out} (+ .md); plots: {', '.join(str(p) for p in pngs)}; took {summary['setup']['wall_s']:.0f} s")
    return 0
