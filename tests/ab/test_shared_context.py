"""Shared-context tasks: one context, several questions (multi-turn over the prefix cache, or
several requests at once), strictly scored, turns run in order."""
import asyncio

import pytest

from lcx_plugin.harness.ab.evaluate import accuracy_phase
from lcx_plugin.harness.ab.report import summarize
from lcx_plugin.harness.ab.shared_context import QUESTIONS, conversation
from lcx_plugin.harness.ab.tasks import build_grid, score, token_tolerance


@pytest.fixture(scope="module")
def turns(tokenizer):
    return conversation("multiturn", 1024, 11, tokenizer)


def test_each_turn_extends_the_previous_prompt_with_its_gold_answer(turns, tokenizer):
    assert [s.turn for s in turns] == list(range(QUESTIONS))
    assert abs(turns[0].prompt_tokens - 1024) <= token_tolerance(1024)
    for prev, cur in zip(turns, turns[1:]):
        assert cur.prompt.startswith(prev.prompt + f" {prev.answers[0]}.\n\n"), cur.prompt[-300:]
        ids_prev, ids_cur = tokenizer.encode(prev.prompt), tokenizer.encode(cur.prompt)
        assert ids_cur[: len(ids_prev) - 1] == ids_prev[:-1]  # the prefix cache sees the same tokens
    answers = [s.answers[0] for s in turns]
    assert len(set(answers)) == QUESTIONS and len({s.group for s in turns}) == 1
    for s in turns:
        assert s.prompt.count(f" is {s.answers[0]}.") == 1  # its fact, once in the context
        assert set(answers) - {s.answers[0]} <= set(s.distractors)


def test_an_earlier_turns_answer_is_wrong_later(turns):
    assert score(turns[2], f" {turns[2].answers[0]}.").exact
    assert not score(turns[2], f" {turns[1].answers[0]}.").exact
    assert not score(turns[2], f" {turns[2].answers[0]} or {turns[0].answers[0]}").exact


def test_shared_context_requests_differ_only_in_their_question(tokenizer):
    samples = conversation("sharedctx", 800, 3, tokenizer)
    head = samples[0].prompt[: samples[0].prompt.rindex("\n\n")]
    assert all(s.prompt.startswith(head + "\n\nWhat is") and s.group is None for s in samples)
    assert len({s.prompt for s in samples}) == QUESTIONS


def test_same_seed_same_conversation_and_the_grid_counts_contexts(tokenizer, turns):
    assert conversation("multiturn", 1024, 11, tokenizer) == turns
    grid = build_grid(["multiturn"], [700], [0.1, 0.9], 2, 0, tokenizer)
    assert len(grid) == 2 * QUESTIONS and len({s.group for s in grid}) == 2


class _Recorder:
    """A streamer that answers each prompt's gold answer after a short wait, logging start/end."""

    def __init__(self, samples):
        self.answer = {s.prompt: s.answers[0] for s in samples}
        self.log = []

    async def stream(self, prompt, max_tokens, ignore_eos=False):
        self.log.append(("start", prompt))
        await asyncio.sleep(0.01)
        self.log.append(("end", prompt))
        yield " " + self.answer[prompt], 1


def test_turns_of_a_conversation_run_in_order_while_conversations_overlap(tokenizer, turns):
    other = conversation("multiturn", 1024, 12, tokenizer)
    samples = turns + other
    rec = _Recorder(samples)
    rows = asyncio.run(accuracy_phase(rec, samples, concurrency=2))
    assert all(r["exact"] for r in rows) and [r["turn"] for r in rows] == [s.turn for s in samples]
    for conv in (turns, other):
        order = [rec.log.index(("start", s.prompt)) for s in conv]
        ends = [rec.log.index(("end", s.prompt)) for s in conv]
        assert all(ends[t] < order[t + 1] for t in range(QUESTIONS - 1))
    starts = [e for e in rec.log[:3] if e[0] == "start"]
    assert len(starts) == 2  # the two conversations' first turns run together
    wrong = [dict(r, exact=r["turn"] != 2, score=float(r["turn"] != 2)) for r in rows]
    summary = summarize({"arm": {"label": "a"}, "samples": rows, "load": _load()},
                        {"arm": {"label": "b"}, "samples": wrong, "load": _load()}, {})
    by_turn = {r["turn"]: r for r in summary["accuracy"]["by_turn"]}
    assert by_turn[2]["n"] == 2 and by_turn[2]["A"]["exact"] == 2 and by_turn[2]["B"]["exact"] == 0
    assert by_turn[1]["B"]["exact"] == 2


def _load():
    return {"tokens_per_s": 1.0, "concurrency": 1,
            "requests": [{"ttft_s": 0.1, "tpot_s": 0.01, "latency_s": 0.2, "tokens": 3}]}
