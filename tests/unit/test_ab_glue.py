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
    # No config: the engine gets none, so it serves lcx's recommended default.
    assert Arm.parse("lcx") == Arm(label="lcx default", kind="engine", backend="lcx", lcx=None)
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


def _speed(ttft, tps):
    return {"ttft_s": ttft, "batch": 8, "max_tokens": 64, "decode_tokens_per_s": tps}


def test_verdict_line_and_demo_targets(tmp_path):
    from lcx_plugin.harness.ab.demo import targets

    a = _arm("stock", [1.0, 1.0, 1.0, 1.0], [0.1])
    b = _arm("lcx", [1.0, 1.0, 1.0, 0.0], [0.1])
    a["speed"], b["speed"] = _speed(10.0, 50.0), _speed(5.0, 150.0)
    b["kv_capacity_tokens"] = 2500
    s = summarize(a, b, {})
    v = s["verdict"]
    assert v["kv_capacity_ratio"] == 2.5 and v["decode_ratio"] == 3.0 and v["ttft_speedup"] == 2.0
    assert v["accuracy_diff_pt"] == pytest.approx(-25.0)
    assert v["line"].startswith("KV capacity 2.5x, decode 3.00x at batch 8, TTFT 2.00x faster, accuracy -25.0 pt [")
    t = targets(s)
    assert not t["kv_capacity_ratio"]["met"] and t["decode_ratio"]["met"] and not t["accuracy_ci_low_pt"]["met"]
    assert t["min_stock_cell_acc"]["value"] == 1.0 and t["min_cell_n"]["value"] == 1 and not t["min_cell_n"]["met"]
    b["speed"] = _speed(20.0, 25.0)
    assert "decode 0.50x at batch 8, TTFT 2.00x slower" in summarize(a, b, {})["verdict"]["line"]
    pngs = write_plots(s, tmp_path, prefix="demo")
    assert (tmp_path / "demo_verdict.png") in pngs and (tmp_path / "demo_verdict.png").read_bytes()[:4] == b"\x89PNG"


class _ScriptedStreamer:
    """Yields one token per ``step`` seconds of fake time, a request's first after ``first`` s."""

    def __init__(self):
        import itertools

        self.calls = []
        self._ids = itertools.count()

    async def stream(self, prompt, max_tokens, ignore_eos=False):
        import asyncio

        self.calls.append((prompt, max_tokens, ignore_eos))
        await asyncio.sleep(0.05 if max_tokens == 1 else 0.01 * next(self._ids))
        for _ in range(max_tokens):
            await asyncio.sleep(0.01)
            yield "x", 1


def test_speed_phase_counts_only_tokens_decoded_while_the_whole_batch_runs():
    import asyncio

    from lcx_plugin.harness.ab.evaluate import speed_phase

    st = _ScriptedStreamer()
    r = asyncio.run(speed_phase(st, "cold", ["p0", "p1", "p2"], 20))
    assert st.calls[0] == ("cold", 1, False) and all(c[1:] == (20, True) for c in st.calls[1:])
    assert r["ttft_s"] >= 0.05 and r["batch"] == 3 and r["output_tokens"] == [20, 20, 20]
    # Three requests at no more than 100 tokens/s each (slower on a busy machine), started 10 ms
    # apart: at most about 300 tokens/s together, counted only while all three decode.
    assert 0 < r["decode_tokens"] < 60 and 0 < r["decode_tokens_per_s"] < 360
    with pytest.raises(RuntimeError, match="never decoded together"):
        asyncio.run(speed_phase(_ScriptedStreamer(), "cold", ["p0", "p1", "p2", "p3", "p4"], 2))


def test_an_engine_childs_progress_reaches_the_parents_stream_whole_and_in_order(tmp_path):
    """The relay an engine arm's child writes its progress through (the child forks from the
    forkserver, so it cannot inherit the parent's stderr): written by another process while the
    relay runs, all of it arrives, in order, by the end of the ``with``; a bar is drawn only where
    asked."""
    import io
    import subprocess
    import sys

    from lcx_plugin.harness.ab.arms import relayed
    from lcx_plugin.harness.progress import Progress

    sink = io.StringIO()
    writer = ("import sys, time\n"
              "from lcx_plugin.harness.progress import Progress\n"
              "with Progress(40, 'arm', open(sys.argv[1], 'a', buffering=1), terminal=False) as p:\n"
              "    for i in range(40):\n"
              "        time.sleep(0.01 * (i % 3))\n"
              "        p.advance()\n")
    with relayed(sink, poll_s=0.05) as path:
        subprocess.run([sys.executable, "-c", writer, path], check=True, timeout=120)
    lines = sink.getvalue().splitlines()
    assert [line.split(" done")[0] for line in lines] == [f"arm: {i}/40" for i in range(1, 41)], lines
    drawn = io.StringIO()
    with Progress(2, "[stock] bar", drawn, terminal=True) as p:
        p.advance(2)
    assert "\x1b[" in drawn.getvalue() and "[stock] bar" in drawn.getvalue()  # a bar, its label as text
