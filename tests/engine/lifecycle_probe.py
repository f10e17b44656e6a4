"""Run inside a child process by test_engine_lifecycle.py: one in-process vLLM engine with lcx,
small enough that requests get preempted, with the builder and the step hook observed.

    python -m tests.engine.lifecycle_probe OUT.json
"""
from __future__ import annotations

import json
import os
import sys


def main(out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker here: the hooks below apply
    from vllm import LLM, SamplingParams

    from lcx_plugin.attention_backends.vllm import backend, compat
    from lcx_plugin.harness.model import prepare

    builds, steps = [], []
    original_build = backend.LcxMetadataBuilder.build

    def build(self, common_prefix_len, m, fast_build=False):
        meta = original_build(self, common_prefix_len, m, fast_build)
        ids = meta.step.request_ids
        builds.append({"ids": list(ids), "seq_lens": m.seq_lens.tolist(), "q_lens": (m.query_start_loc[1:] - m.query_start_loc[:-1]).tolist(),
                       "live_before": sorted(backend.REQUESTS._by_request)})
        for r in ids:  # what a selector with per-request state would keep
            backend.REQUESTS.get(r, 0)["steps"] = backend.REQUESTS.get(r, 0).get("steps", 0) + 1
        return meta

    backend.LcxMetadataBuilder.build = build
    compat.step_listeners.append(lambda gone, fresh: steps.append({"gone": sorted(gone), "fresh": sorted(fresh)}))
    llm = LLM(model=str(prepare()), attention_backend="lcx", dtype="bfloat16", enforce_eager=True, max_model_len=160,
              block_size=32, num_gpu_blocks_override=6, enable_prefix_caching=False, seed=0,
              additional_config={"lcx": {"method": "streaming", "sink": 4, "window": 32}})
    greedy = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    first = llm.generate(["The capital of France is Paris, and the capital of Italy is",
                          "def fibonacci(n):\n    if n < 2:\n        return n\n"], greedy, use_tqdm=False)
    second = llm.generate(["List three prime numbers:"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    json.dump({"builds": builds, "steps": steps, "live_after": sorted(backend.REQUESTS._by_request),
               "first": [len(o.outputs[0].token_ids) for o in first], "second": len(second[0].outputs[0].token_ids)},
              open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
