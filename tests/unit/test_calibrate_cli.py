"""``lcx calibrate`` refuses bad arguments with one line and writes nothing: a prompt length its
needle tasks cannot fit (found from the tokenizer, before the model loads), a sink + window that
covers the prompts, a non-positive count."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lcx_plugin.harness.model import prepare


@pytest.mark.parametrize("args, message", [
    (["--length", "100", "--sink", "16", "--window", "32"], "target_tokens=100 is too small for task 'passkey': it needs at least"),
    (["--length", "300", "--sink", "64", "--window", "256"],
     "sink + window (64 + 256) must be shorter than the prompts (300 tokens)"),
    (["--prompts", "0"], "--prompts must be positive"),
])
def test_bad_arguments_get_one_line_and_no_pattern(tmp_path, args, message):
    out = tmp_path / "pattern.json"
    proc = subprocess.run([sys.executable, "-m", "lcx_plugin.cli", "calibrate", "--model", str(prepare()),
                           "--out", str(out), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lcx calibrate: error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()
