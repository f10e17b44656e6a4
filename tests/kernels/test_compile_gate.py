"""Every Triton kernel compiles for sm_90 (no GPU needed), within shared memory, without spills."""
import json
import os
import subprocess
import sys

from lcx_plugin.kernels.compile_gate import SHARED_LIMIT, all_variants


def test_all_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lcx_plugin.kernels.compile_gate"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    expected = [v.name for v in all_variants()]
    # Paged attention: 16 plain + 12 quantized (int8-g0, int4-g0 at d=64/128; dense, page, page with
    # fp32 dots) + 3 at compacted positions; scoring: token logits 4 plain + 4 quantized + 2
    # position-neutral, page logits 2; HiP's page search 2.
    assert len(expected) == 51, f"expected 35 paged-attention + 14 scoring + 2 search variants, got {expected}"
    assert [r["kernel"] for r in reports] == expected, f"{len(reports)} of {len(expected)} variants reported"
    for r in reports:
        assert r["cubin_bytes"] > 0, r
        assert r["shared_bytes"] <= SHARED_LIMIT, r
        assert r["spill_bytes"] == 0, r
        assert r["registers"] is not None and r["registers"] <= 255, r
