"""The A/B harness's glue: arm specs, the /metrics parser, and the report on hand-made arm results."""
import json

import pytest

from lcx_plugin.harness.ab.arms import Arm, ArmSpecError
from lcx_plugin.harness.ab.report import summarize, write_plots
from lcx_plugin.harness.ab.streaming import kv_capacity_from_metrics
from lcx_plugin.config import LcxConfigError


def test_arm_specs():
    assert Arm.parse("stock") == Arm(label="stock", kind="engine")
    lcx = Arm.parse('lcx:{"method": "dense", "kernel": "torch"}')
    assert (lcx.kind, lcx.backend, lcx.lcx, lcx.label) == ("engine", "lcx", {"method": "dense", "kernel": "torch"},
                                                           "lcx kernel=torch method=dense")
    url = Arm.parse("http://127.0.0.1:8001/v1")
    assert (url.kind, url.url) == ("endpoint", "http://127.0.0.1:8001/v1")


def test_arm_config_file(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"method": "dense"}))
    assert Arm.parse(f"lcx:{f}").lcx == {"method": "dense"}


@pytest.mark.parametrize("spec, err, match", [
    ("vanilla", ArmSpecError, "expected 'stock'"),
    ("lcx:{oops", ArmSpecError, "bad JSON config"),
    ("lcx:/no/such/file.json", ArmSpecError, "neither inline JSON nor an existing file"),
    ('lcx:{"budget": 3}', LcxConfigError, r"unknown key\(s\) \['budget'\]"),
])
def test_bad_arm_specs_fail_before_any_engine_starts(spec, err, match):
    with pytest.raises(err, match=match):
        Arm.parse(spec)


def test_kv_capacity_from_metrics():
    page = ('# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n'
            'vllm:cache_config_info{block_size="128",cache_dtype="auto",engine="0",num_gpu_blocks="364"} 1.0\n')
    assert kv_capacity_from_metrics(page) == 364 * 128
    assert kv_capacity_from_metrics("vllm:num_requests_running 0\n") is None


def _arm(label, scores, ttfts):
    samples = [{"task": t, "target_tokens": n, "depth": d, "seed": i, "prompt_tokens": n, "answers": ["1"],
                "output": "", "score": s, "exact": s == 1.0, "ttft_s": 0.1}
               for i, (s, (t, n, d)) in enumerate(zip(scores, [("passkey", 512, 0.5), ("passkey", 1024, 0.5),
                                                                ("cwe", 512, 0.5), ("multikey", 1024, 0.1)]))]
    reqs = [{"ttft_s": t, "tpot_s": t / 10, "latency_s": t * 2, "tokens": 8} for t in ttfts]
    return {"arm": {"label": label, "kind": "engine"}, "samples": samples, "kv_capacity_tokens": 1000,
            "load": {"concurrency": 2, "requests": reqs, "wall_s": 1.0, "output_tokens": 8 * len(reqs), "tokens_per_s": 16.0}}


def test_summary_pairs_prompts_and_computes_statistics(tmp_path):
    a = _arm("stock", [1.0, 0.0, 0.5, 1.0], [0.1, 0.2, 0.3])
    b = _arm("lcx", [1.0, 1.0, 1.0, 0.0], [0.2, 0.2, 0.4])
    s = summarize(a, b, {"seed": 0})
    overall = s["accuracy"]["overall"]
    assert overall["n"] == 4
    assert (overall["mcnemar"]["n01"], overall["mcnemar"]["n10"]) == (2, 1)
    assert overall["A"]["exact"] == 2 and overall["B"]["exact"] == 3
    assert s["latency"]["B"]["ttft_s"]["p50"]["value"] == pytest.approx(0.2)
    pngs = write_plots(s, tmp_path)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_summary_refuses_arms_run_on_different_prompts():
    a = _arm("stock", [1.0, 0.0, 0.5, 1.0], [0.1])
    b = _arm("lcx", [1.0, 1.0, 1.0, 0.0], [0.1])
    b["samples"][0]["seed"] = 99
    with pytest.raises(ValueError, match="not run on the same prompts"):
        summarize(a, b, {})
