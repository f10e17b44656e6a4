"""Engine children forked from the forkserver (``lcx_plugin/harness/zygote.py``) are what a
``python -m MODULE`` child would have been: the job's environment and argv, the module run as
``__main__``, its output in the log, its exit code, and a kill at the timeout."""
import json
import os
import subprocess
import time

import pytest

from lcx_plugin.harness import zygote

PROBE = "tests.unit.zygote_probe"


def _run(tmp_path, monkeypatch, action, timeout=300):
    out, log = tmp_path / "out.json", tmp_path / "child.log"
    monkeypatch.setenv("ZYGOTE_PARENT_ONLY", "1")
    code = zygote.run(PROBE, [str(out), action], {"ZYGOTE_PROBE": "job", "PATH": os.environ["PATH"]}, str(log), timeout)
    return code, json.loads(out.read_text()), log.read_text()


def test_a_forked_child_runs_the_module_as_main_with_the_jobs_environment_and_log(tmp_path, monkeypatch):
    assert zygote.enabled()  # pytest runs as ``python -m pytest``
    code, seen, log = _run(tmp_path, monkeypatch, "ok")
    assert code == 0
    assert seen["name"] == "__main__" and seen["argv"][1:] == [str(tmp_path / "out.json"), "ok"]
    assert seen["env"] == "job" and seen["leaked"] is None  # the job's environment, not the parent's
    assert seen["vllm_preloaded"]  # forked after the imports
    assert "probe says hello" in log and "probe warns" in log


def test_a_failing_child_reports_its_exit_code(tmp_path, monkeypatch):
    code, _, log = _run(tmp_path, monkeypatch, "fail")
    assert code == 3 and "probe says hello" in log


def test_a_child_that_outlives_its_timeout_is_killed(tmp_path, monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        _run(tmp_path, monkeypatch, "sleep", timeout=5)
    assert time.monotonic() - t0 < 30
    assert json.loads((tmp_path / "out.json").read_text())["env"] == "job"  # it had started


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("LCX_FORKSERVER", "0")
    assert not zygote.enabled()
