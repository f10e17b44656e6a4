"""The reliability matrix's engines (``lcx_plugin/harness/matrix.py``): stock and every registered
method, each on one engine at ease and one under pressure (and one split over ranks), run once per
test session."""
from __future__ import annotations

import functools

import pytest

from lcx_plugin.harness import matrix
from lcx_plugin.harness.model import prepare


@functools.cache
def _row(row: str, log_dir: str) -> tuple[dict, dict]:
    return matrix.run_row(row, str(prepare()), log_dir)


@functools.cache
def _tensor_parallel(row: str, log_dir: str) -> dict:
    return matrix.run_tensor_parallel(row, str(prepare()), log_dir)


@pytest.fixture(scope="session")
def tensor_parallel_engine(tmp_path_factory):
    """``tensor_parallel_engine(row) -> result`` of the row's at-ease engine over ``matrix.TP_RANKS`` ranks."""
    log_dir = str(tmp_path_factory.mktemp("tensor-parallel-logs"))
    return lambda row: _tensor_parallel(row, log_dir)


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """``engines(row) -> (at ease, pressured)`` results."""
    log_dir = str(tmp_path_factory.mktemp("reliability-logs"))
    return lambda row: _row(row, log_dir)
