"""bench/extrapolation.py's bookkeeping: the prompt grid, resuming only a run of the same machine
and config, and the targets read from the cells (the engine runs themselves are the benchmark)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_extrapolation", REPO / "bench" / "extrapolation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(passkey: float, multikey: float) -> dict:
    return {"acc": {"passkey": passkey, "multikey": multikey}, "n": {"passkey": 24, "multikey": 24}}


def test_grid_is_24_prompts_per_task_of_the_asked_length(bench):
    from transformers import AutoTokenizer

    from lcx_plugin.harness.ab.tasks import token_tolerance
    from lcx_plugin.harness.model import prepare

    tok = AutoTokenizer.from_pretrained(str(prepare()))
    samples = bench.samples_for(4096, tok)
    for task in bench.TASKS:
        mine = [s for s in samples if s.task == task]
        assert len(mine) == 24 and len({s.seed for s in mine}) == 24
        assert all(abs(s.prompt_tokens - 4096) <= token_tolerance(4096) for s in mine)
        assert all(s.prompt_tokens + s.max_tokens <= bench.MAX_LEN for s in mine)
    # the longest target still fits the engine's max_model_len with its answer
    assert 32768 + token_tolerance(32768) + 24 <= bench.MAX_LEN


def test_resume_refuses_another_machine_or_config(bench, tmp_path):
    out = tmp_path / "x.json"
    first = bench._load(out, "machine A", bench.LCX_CONFIG, fresh=False)
    first["lcx"]["4096"] = _cell(0.5, 0.5)
    bench._write(first, out)
    again = bench._load(out, "machine A", bench.LCX_CONFIG, fresh=False)
    assert again["lcx"]["4096"]["acc"] == {"passkey": 0.5, "multikey": 0.5} and again["complete"] is False
    with pytest.raises(SystemExit, match="machine B"):
        bench._load(out, "machine B", bench.LCX_CONFIG, fresh=False)
    with pytest.raises(SystemExit, match="--fresh"):
        bench._load(out, "machine A", {**bench.LCX_CONFIG, "budget": 1024}, fresh=False)
    assert bench._load(out, "machine B", bench.LCX_CONFIG, fresh=True)["lcx"] == {}
    out.write_text("{not json")
    with pytest.raises(SystemExit, match="not a result file"):
        bench._load(out, "machine A", bench.LCX_CONFIG, fresh=False)


def test_targets_compare_with_lcx_own_4k(bench, tmp_path):
    result = bench._load(tmp_path / "y.json", "m", bench.LCX_CONFIG, fresh=False)
    result["lcx"].update({"4096": _cell(0.8, 0.6), "16384": _cell(0.7, 0.55), "32768": _cell(0.5, 0.45)})
    s = bench._summary(result)
    assert s["lcx"]["4096"]["all"] == pytest.approx(0.7)
    assert s["targets"] == {"lcx 16384 within 10 points of lcx 4k": True,  # 0.625 >= 0.6
                            "lcx 32768 within 20 points of lcx 4k": False}  # 0.475 < 0.5
    result["lcx"].pop("32768")
    assert bench._summary(result)["targets"]["lcx 32768 within 20 points of lcx 4k"] is None
    json.dumps(s)


def test_cells_to_run_skip_what_is_in_and_take_the_speed_cells_as_asked(bench, tmp_path):
    result = bench._load(tmp_path / "z.json", "m", bench.LCX_CONFIG, fresh=False)
    result["stock"]["4096"] = _cell(0.5, 0.5)
    result["lcx"]["speed"] = {"decode_tps": 1.0}
    every, arms = list(bench.LENGTHS), list(bench.ARMS)
    cells, speed = bench.to_run(result, every, arms)
    assert ("stock", 4096) not in cells and ("lcx", 4096) in cells and len(cells) == 7 and speed == ["stock"]
    assert bench.to_run(result, [4096, 8192], arms) == ([("lcx", 4096), ("stock", 8192), ("lcx", 8192)], [])
    assert bench.to_run(result, every, arms, "skip")[1] == []
    assert bench.to_run(result, [4096], arms, "only") == ([], ["stock"])


def test_a_cell_runs_in_parts_and_a_stopped_one_continues_where_it_stopped(bench, tmp_path, monkeypatch):
    """Parts of ``PART`` prompts, each kept in the result file when it finishes; a run stopped in a
    part continues after the last kept one and asks the engine for the other prompts only once."""
    from transformers import AutoTokenizer

    from lcx_plugin.harness import batch
    from lcx_plugin.harness.model import prepare

    samples = bench.samples_for(4096, AutoTokenizer.from_pretrained(str(prepare())))
    answer = {s.prompt: s.answers[0] for s in samples}
    asked: list[int] = []
    stop_after = [2]

    def fake_run_arm(spec, log_path=None, settings=None, timeout=None):  # stands for the engine run
        if len(asked) == stop_after[0]:
            raise RuntimeError("stopped")
        asked.append(len(spec.prompts))
        texts = [f" {answer[p]}." if i % 4 < 2 else " a small wooden key" for i, p in enumerate(spec.prompts)]
        return {"texts": texts, "prompt_tokens": [7] * len(texts), "batch_s": 1.5}

    monkeypatch.setattr(batch, "run_arm", fake_run_arm)
    out = tmp_path / "r.json"
    result = bench._load(out, "m", bench.LCX_CONFIG, fresh=False)

    def save(done):
        bench._keep(result, "lcx", 4096, done)
        bench._write(result, out)

    with pytest.raises(RuntimeError, match="stopped"):
        bench._cell("lcx", 4096, bench.LCX_CONFIG, samples, "model", None, tmp_path, None, save)
    kept = bench._load(out, "m", bench.LCX_CONFIG, fresh=False)
    assert asked == [bench.PART, bench.PART] and "4096" not in kept["lcx"]
    assert len(bench._kept(kept, "lcx", 4096)["texts"]) == 2 * bench.PART
    # the two kept parts are one seed of every task and depth, scored half right each
    assert kept["summary"]["partial"] == {"lcx": {"4096": {"passkey": 0.5, "multikey": 0.5,
                                                            "n": {"passkey": 8, "multikey": 8}}}}
    assert bench.to_run(kept, [4096], ["lcx"], "skip")[0] == [("lcx", 4096)]
    bench.plot(kept, tmp_path / "kept.png")  # the unfinished cell drawn with open markers
    assert (tmp_path / "kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    asked.clear()
    stop_after[0] = None
    cell = bench._cell("lcx", 4096, bench.LCX_CONFIG, samples, "model", None, tmp_path, bench._kept(kept, "lcx", 4096),
                       save)
    assert sum(asked) == len(samples) - 2 * bench.PART
    # half of each part answered, both tasks alike: half of each task, the kept parts included
    assert cell["acc"] == {"passkey": 0.5, "multikey": 0.5} and cell["n"] == {"passkey": 24, "multikey": 24}
    assert cell["wall_s"] == pytest.approx(1.5 * len(samples) / bench.PART) and len(cell["outputs"]) == len(samples)
    # the outputs come back in the grid's order: each sample's own answer where its run position was answered
    position = {k: j for j, k in enumerate(bench.run_order(samples))}
    assert [out == f" {s.answers[0]}." for out, s in zip(cell["outputs"], samples)] == \
        [position[k] % 4 < 2 for k in range(len(samples))]
    bench._keep(result, "lcx", 4096, None)
    assert "partial" not in result


def test_the_run_order_spreads_every_part_over_the_prompt(bench):
    """Every part of a cell spans the depths from near the start to near the end, both tasks, and
    every two parts hold one prompt of each task and depth: a stopped cell is not biased by depth."""
    from types import SimpleNamespace

    samples = [SimpleNamespace(task=t, depth=d) for t in bench.TASKS for d in bench.DEPTHS
               for _ in range(bench.SEEDS_PER_DEPTH)]
    order = bench.run_order(samples)
    assert sorted(order) == list(range(len(samples)))
    for start in range(0, len(order), bench.PART):
        part = [samples[k] for k in order[start:start + bench.PART]]
        assert {s.task for s in part} == set(bench.TASKS)
        assert min(s.depth for s in part) <= 0.3 and max(s.depth for s in part) >= 0.75
    for start in range(0, len(order), 2 * bench.PART):
        pair = [samples[k] for k in order[start:start + 2 * bench.PART]]
        assert sorted((s.task, s.depth) for s in pair) == sorted((t, d) for t in bench.TASKS for d in bench.DEPTHS)
