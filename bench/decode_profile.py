"""Where a decode step's time goes: stock against an lcx config, in the real engine, in one run.

    ./lcx bench decode_profile [--context 7000] [--batch 8] [--tokens 64] [--lcx JSON]

Each arm runs in a fresh process: ``--batch`` requests over as many different documents of about
``--context`` tokens decode ``--tokens`` tokens together. Over the steps where every request decodes
(no prompt chunk in the step) it times each layer's attention forward and the step (from one
layer-0 forward to the next), and for lcx the parts: the KV write (page summaries included), the
retrieval heads' side (TokenSelect's selection, then the engine's op over the selected pages) and
the streaming heads' sink + window attention. Default config: lcx's recommended default. Writes
``bench/results/decode_profile.json``; the ratios compare the two arms of this run only.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("the river ran past a quiet town where people met each morning to trade bread fish stories and news "
         "about weather roads harvests and the old bridge").split()


def _documents(tokenizer, n: int, length: int) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": tokenizer(" ".join(rng.choice(WORDS) for _ in range(length)))["input_ids"][:length]}
            for _ in range(n)]


class _Timers:
    """Seconds and calls per label, counted only inside all-decode steps."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.decoding = False
        self.parts: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        self.layer0: list[float] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            t = time.perf_counter()
            result = original(*args, **kwargs)
            if timers.decoding:
                timers.parts[label][0] += 1
                timers.parts[label][1] += time.perf_counter() - t
            return result

        setattr(owner, name, timed)

    def wrap_forward(self, cls) -> None:
        original = cls.forward
        timers = self

        def forward(impl, layer, query, *args, **kwargs):
            timers.decoding = query.shape[0] == timers.batch  # every request decodes one token
            t = time.perf_counter()
            result = original(impl, layer, query, *args, **kwargs)
            if timers.decoding:
                timers.parts["attention forward"][0] += 1
                timers.parts["attention forward"][1] += time.perf_counter() - t
                if ".layers.0." in layer.layer_name:
                    timers.layer0.append(t)
            return result

        cls.forward = forward


def child(arm: str, lcx: dict | None, args: dict, out: str) -> None:
    from lcx_plugin.harness.launcher import engine_args
    from vllm import LLM, SamplingParams

    timers = _Timers(args["batch"])
    if arm == "stock":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as impl
    else:
        from lcx_plugin import layer as core, state
        from lcx_plugin.attention_backends.vllm import cpu_native
        from lcx_plugin.attention_backends.vllm.backend import LcxAttentionImpl as impl
        from lcx_plugin.selectors.token_select import TokenSelect

        timers.wrap(impl, "do_kv_cache_update", "KV write (with page summaries)")
        timers.wrap(state.PageSummaries, "update", "page summaries")
        timers.wrap(core.LayerCore, "run", "retrieval heads (selection + attention)")
        timers.wrap(TokenSelect, "select", "TokenSelect selection")
        timers.wrap(cpu_native, "attention_page_lists", "engine op over the selected pages")
        timers.wrap(core, "window_attention", "streaming heads (sink + window)")
    timers.wrap_forward(impl)
    # The KV write runs just before its layer's forward: it is counted by the last forward's step.
    llm = LLM(**engine_args(args["model"], backend=None if arm == "stock" else "lcx", lcx=lcx,
                            overrides={"max_num_seqs": args["max_num_seqs"] or args["batch"]}))
    prompts = _documents(llm.get_tokenizer(), args["batch"], args["context"])
    params = SamplingParams(max_tokens=args["tokens"], ignore_eos=True, temperature=0)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    steps = sorted(b - a for a, b in zip(timers.layer0, timers.layer0[1:]))
    per_call = {k: {"calls": n, "ms_per_call": 1e3 * s / max(1, n)} for k, (n, s) in timers.parts.items()}
    Path(out).write_text(json.dumps({
        "arm": arm, "lcx": lcx, "wall_s": time.perf_counter() - t0, "decode_steps": len(steps) + 1,
        "step_ms_median": 1e3 * steps[len(steps) // 2] if steps else None,
        "step_ms_mean": 1e3 * sum(steps) / len(steps) if steps else None,
        "step_ms_p90": 1e3 * steps[int(0.9 * (len(steps) - 1))] if steps else None, "per_layer_call": per_call}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=7000, help="tokens per document (default 7000)")
    ap.add_argument("--batch", type=int, default=8, help="requests decoding together, one document each (default 8)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens each request decodes (default 64)")
    ap.add_argument("--max-num-seqs", type=int, default=0,
                    help="the engines' max_num_seqs (default: --batch; lcx ab and lcx demo leave vLLM's own)")
    ap.add_argument("--lcx", default=None, help="lcx config as JSON (default: the recommended default)")
    ap.add_argument("--out", default=str(REPO / "bench/results/decode_profile.json"), help="report (JSON)")
    ap.add_argument("--child", nargs=4, metavar=("ARM", "LCX", "ARGS", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        arm, lcx, args, out = a.child
        child(arm, json.loads(lcx), json.loads(args), out)
        return 0
    from lcx_plugin.harness.ab.report import machine_line
    from lcx_plugin.harness.launcher import child_env
    from lcx_plugin.harness.model import prepare
    from lcx_plugin.harness.settings import choose, machine_record
    from lcx_plugin.recommended import RECOMMENDED

    settings = choose()
    lcx = json.loads(a.lcx) if a.lcx else RECOMMENDED
    args = {"model": str(prepare()), "context": a.context, "batch": a.batch, "tokens": a.tokens, "max_num_seqs": a.max_num_seqs}
    env = {**child_env(settings), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    arms = {}
    with tempfile.TemporaryDirectory(prefix="lcx-decode-profile-") as tmp:
        for arm in ("stock", "lcx"):
            out = Path(tmp, f"{arm}.json")
            print(f"{arm}: {a.batch} requests of ~{a.context} tokens, {a.tokens} tokens each ...", flush=True)
            log = Path(tmp, f"{arm}.log")
            with open(log, "w") as f:
                rc = subprocess.run([sys.executable, __file__, "--child", arm, json.dumps(lcx if arm == "lcx" else None),
                                     json.dumps(args), str(out)], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            if rc or not out.exists():
                print(log.read_text()[-3000:])
                return 1
            arms[arm] = json.loads(out.read_text())
            print(f"  step {arms[arm]['step_ms_median']:.1f} ms", flush=True)
    report = {"machine": machine_line(machine_record(settings)), "setup": args | {"lcx": lcx}, "arms": arms,
              "step_speedup": arms["stock"]["step_ms_median"] / arms["lcx"]["step_ms_median"],
              "attention_speedup": arms["stock"]["per_layer_call"]["attention forward"]["ms_per_call"]
              / arms["lcx"]["per_layer_call"]["attention forward"]["ms_per_call"]}
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"decode step: stock {arms['stock']['step_ms_median']:.1f} ms, lcx {arms['lcx']['step_ms_median']:.1f} ms "
          f"({report['step_speedup']:.2f}x); written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
