"""The README's main job: the same prompts through stock vLLM and lcx, side by side."""
from __future__ import annotations

import json
from pathlib import Path

from lcx_plugin.model import prepare
from lcx_plugin.prompts import SHORT_PROMPTS, long_prompt
from lcx_plugin.vllm_runner import ArmSpec, run_arm


def run_demo(max_tokens: int = 24, lcx: dict | None = None, out: str = "out/demo.json") -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model = str(prepare())
    prompts = SHORT_PROMPTS[:4] + [long_prompt(3000, seed=1)]
    arms = {"stock": ArmSpec(model=model), "lcx": ArmSpec(model=model, backend="lcx", lcx=lcx or {})}
    results = {}
    for name, spec in arms.items():
        spec.prompts, spec.max_tokens = prompts, max_tokens
        with console.status(f"[bold]running {name} arm (engine start ~40 s, then {len(prompts)} prompts)"):
            results[name] = run_arm(spec)
        console.print(f"{name}: engine up in {results[name]['startup_s']:.1f} s, batch of "
                      f"{len(prompts)} prompts in {results[name]['batch_s']:.2f} s")

    table = Table(title=f"stock vs lcx (greedy, {max_tokens} new tokens, eager)", show_lines=True)
    table.add_column("prompt (tokens)", max_width=28)
    table.add_column("stock output", max_width=40)
    table.add_column("lcx output", max_width=40)
    table.add_column("same tokens")
    same_all = True
    for i, p in enumerate(prompts):
        same = results["stock"]["token_ids"][i] == results["lcx"]["token_ids"][i]
        same_all &= same
        head = p if len(p) < 60 else p[:40] + " … " + p[-20:]
        table.add_row(f"{head} ({results['stock']['prompt_tokens'][i]})", results["stock"]["texts"][i],
                      results["lcx"]["texts"][i], "[green]yes" if same else "[red]NO")
    console.print(table)
    ratio = results["lcx"]["batch_s"] / results["stock"]["batch_s"]
    console.print(f"batch time lcx/stock = {ratio:.2f}  (lower is better; see bench/ for TTFT and decode tokens/s)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"prompts": prompts, **results}, indent=1))
    console.print(f"full results: {out}")
    return 0 if same_all else 1
