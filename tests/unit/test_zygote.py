"""Engine children forked from the forkserver (``lcx_plugin/harness/zygote.py``) are what a
``python -m MODULE`` child would have been: the job's environment and argv, the module run as
``__main__``, its output in the log, its exit code, and a kill at the timeout."""
import json
import os
import time

from lcx_plugin.harness import zygote

PROBE = "tests.unit.zygote_probe"


def _run(tmp_path, action, timeout=300):
    out, log = tmp_path / "out.json", tmp_path / "child.log"
    os.environ["ZYGOTE_PARENT_ONLY"] = "1"
    try:
        code = zygote.run(PROBE, [str(out), action], {"ZYGOTE_PROBE": "job", "PATH": os.environ["PATH"]}, str(log),
                          timeout)
    finally:
        del os.environ["ZYGOTE_PARENT_ONLY"]
    return code, json.loads(out.read_text()), log.read_text()


def test_a_forked_child_runs_the_module_as_main_with_the_jobs_environment_and_log(tmp_path):
    assert zygote.enabled()  # pytest runs as ``python -m pytest``
    code, seen, log = _run(tmp_path, "ok")
    assert code == 0
    assert seen["name"] == "__main__" and seen["argv"][1:] == [str(tmp_path / "out.json"), "ok"]
    assert seen["env"] == "job" and seen["leaked"] is None  # the job's environment, not the parent's
    assert seen["vllm_preloaded"]  # forked after the imports
    assert "probe says hello" in log and "probe warns" in log


def test_a_failing_child_reports_its_exit_code(tmp_path):
    code, _, log = _run(tmp_path, "fail")
    assert code == 3 and "probe says hello" in log


def test_a_child_that_outlives_its_timeout_is_killed(tmp_path):
    t0 = time.monotonic()
    code, _, _ = _run(tmp_path, "sleep", timeout=5)
    assert code == -9 and time.monotonic() - t0 < 30


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LCX_FORKSERVER", "0")
    assert not zygote.enabled()
