"""``./lcx demo --reduced``: the main job's whole code path (both real engines, stock and lcx with no
config, accuracy, load and speed phases, report, plots, verdict and targets) on a tiny grid."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERDICT = re.compile(r"^KV capacity (\d+\.\d)x, decode (\d+\.\d\d)x at batch 2, TTFT (\d+\.\d\d)x (faster|slower), "
                     r"accuracy ([+-]\d+\.\d) pt \[([+-]\d+\.\d), ([+-]\d+\.\d)\] \(n=2 paired\)$")


def test_reduced_demo_writes_the_report_and_the_verdict(tmp_path):
    out = tmp_path / "ab_default.json"
    proc = subprocess.run(["./lcx", "demo", "--reduced", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arms"]["A"]["label"] == "stock" and report["arms"]["B"] == {
        "label": "lcx default", "kind": "engine", "backend": "lcx", "lcx": None, "url": None}
    # The engine served lcx's recommended default, not dense: its KV capacity is the head split's.
    kv = report["kv_capacity_tokens"]
    assert kv["B"] > 2 * kv["A"] > 0
    line = report["verdict"]["line"]
    m = VERDICT.match(line)
    assert m, line
    assert float(m.group(1)) == round(kv["B"] / kv["A"], 1)
    for side in ("A", "B"):
        sp = report["speed"][side]
        assert sp["batch"] == 2 and sp["output_tokens"] == [8, 8] and sp["decode_tokens_per_s"] > 0 and sp["ttft_s"] > 0
    (cell,) = report["accuracy"]["by_task_length"]
    assert (cell["task"], cell["length"], cell["n"]) == ("passkey", 512, 2)
    targets = report["demo"]["targets"]
    assert report["demo"]["reduced"] is True and set(targets) == {
        "kv_capacity_ratio", "decode_ratio", "accuracy_ci_low_pt", "min_stock_cell_acc", "min_cell_n"}
    assert targets["min_cell_n"] == {**targets["min_cell_n"], "value": 2, "met": False}
    assert f"verdict: {line}" in proc.stdout and "targets missed: " in proc.stdout
    md = out.with_suffix(".md").read_text()
    assert md.startswith(f"**stock → lcx default: {line}**") and "| target | value | met |" in md
    for png in ("ab_default_verdict.png", "ab_default_needle_heatmap.png", "ab_default_latency_cdf.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
