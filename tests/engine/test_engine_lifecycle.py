"""What lcx relies on from the engine at run time, checked on the real engine: the request identity
of each batch row across steps, preemption and finishing (which drop per-request state), the
bf16-emulation warning, and KV capacity reported at bf16."""
import json
import os
import subprocess
import sys

import pytest

from lcx_plugin.harness.batch import ArmSpec, run_arm
from lcx_plugin.harness.model import prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    out, log = tmp / "probe.json", tmp / "probe.log"
    env = {**os.environ, "LCX_CPU_FLAGS": "avx2,fma", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "tests.engine.lifecycle_probe", str(out)], stdout=f,
                              stderr=subprocess.STDOUT, env=env, timeout=900)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return json.loads(out.read_text()), text


def test_rows_keep_their_request_identity_through_preemption(probe):
    data, _ = probe
    builds, steps = data["builds"], data["steps"]
    assert data["first"] == [100, 100] and data["second"] == 4
    # Each request's context grows by exactly what was scheduled for it, whichever row it sits in.
    seen = {}
    for b in builds:
        for rid, s, q in zip(b["ids"], b["seq_lens"], b["q_lens"]):
            if rid in seen and s != q:  # not a restart from scratch after preemption
                assert s == seen[rid] + q, (rid, seen[rid], s, q)
            seen[rid] = s
    preempted = {r for st in steps for r in st["gone"]}
    resumed = [r for st in steps[1:] for r in st["fresh"] if r in preempted]
    assert resumed, f"the 6-block cache should have forced a preemption and a resume: {steps}"


def test_per_request_state_is_dropped_when_requests_end_or_are_preempted(probe):
    data, _ = probe
    for b, st in zip(data["builds"][1:], data["steps"][1:]):
        assert not set(st["gone"]) & set(b["live_before"]), "state of an ended request reached the next step"
    first_ids = set(data["builds"][0]["ids"])
    assert not first_ids & set(data["live_after"]), "the first batch's state outlived it"


def test_bf16_on_an_emulating_cpu_warns_once(probe):
    _, log = probe
    assert log.count("bfloat16 matrix work is emulated") == 1, log[-3000:]


def test_kv_capacity_is_reported_at_bf16(tmp_path):
    """A float32 engine's capacity, converted to bf16, equals what a bf16 engine reports."""
    caps = {}
    for dtype in ("bfloat16", "float32"):
        spec = ArmSpec(model=str(prepare()), prompts=["Hi"], max_tokens=1, engine={"dtype": dtype, "max_model_len": 512})
        caps[dtype] = run_arm(spec, log_path=str(tmp_path / f"{dtype}.log"))["kv_capacity"]
    assert caps["bfloat16"]["tokens"] == caps["bfloat16"]["tokens_bf16"]
    assert caps["float32"]["tokens_bf16"] == caps["bfloat16"]["tokens"], caps
    assert caps["float32"]["tokens"] * 2 == caps["float32"]["tokens_bf16"]
