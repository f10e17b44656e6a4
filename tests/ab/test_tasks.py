"""Deterministic long-context task generators, grids and scoring."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from lcx_plugin.harness.ab.tasks import (
    MAX_TOKENS,
    TASKS,
    Sample,
    build_grid,
    derive_seed,
    generate,
    max_usable_length,
    score,
    token_tolerance,
)

NEEDLE_TASKS = ("passkey", "multikey", "multivalue", "vartrack")


def _context(sample: Sample) -> str:
    start, end = sample.context_span
    return sample.prompt[start:end]


# --------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample(task, make_sample, tokenizer):
    first = make_sample(task, 512, 0.5, 7)
    again = generate(task, 512, 0.5, 7, tokenizer)  # not cached
    assert again == first


@pytest.mark.parametrize("task", TASKS)
def test_different_seed_different_prompt(task, make_sample):
    assert make_sample(task, 512, 0.5, 7).prompt != make_sample(task, 512, 0.5, 8).prompt


# --------------------------------------------------------------------------- content and layout

@pytest.mark.parametrize("task", TASKS)
def test_answers_are_in_the_context(task, make_sample):
    sample = make_sample(task, 512, 0.5, 7)
    context = _context(sample)
    assert sample.answers
    for answer in sample.answers:
        assert re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", context), answer
    sc = score(sample, context)
    assert sc.partial == 1.0
    assert not sc.exact, "the context also names the distractors: reciting it is not an exact answer"
    assert sample.distractors and not set(sample.distractors) & set(sample.answers)
    for d in sample.distractors:
        assert re.search(rf"(?<![A-Za-z0-9]){re.escape(d)}(?![A-Za-z0-9])", context), d
    assert sample.max_tokens == MAX_TOKENS[task]
    assert sample.prompt.rstrip().endswith(("is", "are", "are:"))


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_question_does_not_leak_the_answer(task, make_sample):
    sample = make_sample(task, 512, 0.5, 7)
    question = sample.prompt[sample.context_span[1]:]
    assert score(sample, question).partial == 0.0


def test_passkey_is_five_digits_and_multikey_seven(make_sample):
    assert re.fullmatch(r"\d{5}", make_sample("passkey", 512, 0.5, 7).answers[0])
    multikey = make_sample("multikey", 512, 0.5, 7)
    assert re.fullmatch(r"\d{7}", multikey.answers[0])
    magic = re.findall(r"The special magic number for ([a-z]+-[a-z]+) is (\d{7})\.", _context(multikey))
    assert len(magic) >= 2 and len({k for k, _ in magic}) == len(magic)  # distinct distractor keys
    asked = [v for k, v in magic if k in multikey.prompt[multikey.context_span[1]:]]
    assert asked == [multikey.answers[0]]


def test_vartrack_chain_resolves_to_the_asked_value(make_sample):
    sample = make_sample("vartrack", 512, 0.5, 7)
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", _context(sample)))

    def resolve(name: str) -> str:
        value = assignments[name]
        return resolve(value[4:]) if value.startswith("VAR ") else value

    value = re.search(r"value (\d+)", sample.prompt[sample.context_span[1]:]).group(1)
    assert {n for n in assignments if resolve(n) == value} == set(sample.answers)
    assert len(assignments) > len(sample.answers)  # a distractor chain exists


def test_cwe_answers_are_the_most_frequent_words(make_sample):
    sample = make_sample("cwe", 512, 0.3, 7)
    words = re.findall(r"^\d+\. (\S+)$", _context(sample), flags=re.MULTILINE)
    counts = Counter(words)
    rarest_common = min(counts[w] for w in sample.answers)
    most_other = max(c for w, c in counts.items() if w not in sample.answers)
    assert rarest_common > most_other
    assert sample.depth == 0.3  # recorded though meaningless
    first_line = sample.prompt[sample.needle_char_offset:].split("\n", 1)[0]
    assert first_line.split(". ", 1)[1] in sample.answers


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_depth(task, depth, make_sample):
    sample = make_sample(task, 2048, depth, 11)
    start, end = sample.context_span
    offset = sample.needle_char_offset
    assert start <= offset < end
    relative = (offset - start) / (end - start)
    assert abs(relative - depth) <= 0.03, relative
    needle = sample.prompt[offset:].split(".", 1)[0]
    assert sample.answers[0] in needle
    # the later chain items (values / variables) follow the first one, in order
    positions = [sample.prompt.index(a, offset) for a in sample.answers]
    assert positions == sorted(positions)


# --------------------------------------------------------------------------- token fitting

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("target", [512, 2048])
def test_prompt_tokens_near_target(task, target, make_sample, tokenizer):
    sample = make_sample(task, target, 0.5, 3)
    assert sample.prompt_tokens == len(tokenizer.encode(sample.prompt))
    assert abs(sample.prompt_tokens - target) <= token_tolerance(target)


def test_tokenizes_only_a_few_times(tokenizer):
    calls = []

    class Counting:
        def encode(self, text):
            calls.append(len(text))
            return tokenizer.encode(text)

    generate("passkey", 2048, 0.5, 5, Counting())
    assert len(calls) <= 5


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "needle"}, "needle"),
        ({"depth": -0.1}, "-0.1"),
        ({"depth": 1.5}, "1.5"),
        ({"target_tokens": 20}, "target_tokens=20"),
        ({"target_tokens": 0}, "target_tokens=0"),
        ({"seed": "x"}, "seed='x'"),
    ],
)
def test_generate_rejects_bad_input(kwargs, match, tokenizer):
    args = {"task": "passkey", "target_tokens": 512, "depth": 0.5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=re.escape(match)):
        generate(tokenizer=tokenizer, **args)


def test_too_small_target_names_the_task_and_minimum(tokenizer):
    with pytest.raises(ValueError, match=r"too small for task 'vartrack': it needs at least \d+ tokens"):
        generate("vartrack", 100, 0.5, 0, tokenizer)


# --------------------------------------------------------------------------- grid

def test_build_grid_is_deterministic_with_distinct_seeds(tokenizer):
    args = (["passkey", "cwe"], [512], [0.0, 1.0], 2, 42, tokenizer)
    grid = build_grid(*args, max_context=2048)
    assert len(grid) == 2 * 1 * 2 * 2
    assert grid == build_grid(*args)
    assert len({s.seed for s in grid}) == len(grid)
    assert [(s.task, s.depth) for s in grid[:4]] == [("passkey", 0.0)] * 2 + [("passkey", 1.0)] * 2
    assert grid[0].seed == derive_seed(42, "passkey", 512, 0.0, 0)


def test_build_grid_rejects_lengths_beyond_max_context(tokenizer):
    usable = max_usable_length(4096, MAX_TOKENS["cwe"])
    assert usable + token_tolerance(usable) + MAX_TOKENS["cwe"] <= 4096
    assert usable + 1 + token_tolerance(usable + 1) + MAX_TOKENS["cwe"] > 4096
    with pytest.raises(ValueError, match=rf"\[4096\].*largest usable length is {usable}"):
        build_grid(["passkey", "cwe"], [512, 4096], [0.5], 1, 0, tokenizer, max_context=4096)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ["passkey", "bogus"]}, "'bogus'"),
        ({"lengths": [512, 512]}, "duplicates"),
        ({"depths": [2.0]}, "depth=2.0"),
        ({"samples_per_cell": 0}, "samples_per_cell=0"),
    ],
)
def test_build_grid_rejects_bad_input(kwargs, match, tokenizer):
    args = {"tasks": ["passkey"], "lengths": [512], "depths": [0.5], "samples_per_cell": 1, "seed": 0,
            **kwargs}
    with pytest.raises(ValueError, match=re.escape(match)):
        build_grid(tokenizer=tokenizer, **args)


# --------------------------------------------------------------------------- scoring

def _sample(task: str, answers: tuple[str, ...], distractors: tuple[str, ...] = ()) -> Sample:
    return Sample(task=task, target_tokens=0, depth=0.5, seed=0, prompt="", answers=answers,
                  max_tokens=MAX_TOKENS[task], needle_char_offset=0, prompt_tokens=0, context_span=(0, 0),
                  distractors=distractors)


def _exact(sample, text):
    return score(sample, text).exact


def test_exact_means_the_answers_and_nothing_else():
    passkey = _sample("passkey", ("48213",), ("55120", "90871"))
    assert _exact(passkey, " 48213.") and _exact(passkey, "The pass key is 48213, yes 48213")
    assert not _exact(passkey, " 4821") and not _exact(passkey, "")
    assert not _exact(passkey, "48213 or 55120"), "a listed distractor makes the answer wrong"
    assert not _exact(passkey, "48213 or 77777"), "so does any other number shaped like the answer"
    assert _exact(passkey, "48213 (pass key number 1)"), "numbers of another shape are not candidates"
    multikey = _sample("multikey", ("1234567",), ("7654321", "2222222", "3333333"))
    assert _exact(multikey, "it is 1234567")
    assert not _exact(multikey, "1234567, 7654321, 2222222 and 3333333"), "listing every magic number is wrong"
    vartrack = _sample("vartrack", ("QWERT", "ASDFG"), ("ZXCVB", "POIUY"))
    assert _exact(vartrack, "qwert, VAR ASDFG")
    assert not _exact(vartrack, "QWERT, ASDFG, ZXCVB, POIUY"), "listing every variable name is wrong"
    assert not _exact(vartrack, "QWERT, ASDFG, MNBVC"), "an unplanted name is an extra candidate too"
    cwe = _sample("cwe", ("bako", "mire"), ("tusa", "zelo"))
    assert _exact(cwe, "BAKO and Mire") and not _exact(cwe, "bako, mire, tusa")


def test_score_whole_token_rule():
    sample = _sample("multivalue", ("1234567",))
    assert score(sample, "91234567").partial == 0.0
    assert score(sample, "x1234567").partial == 0.0
    assert score(sample, "1234567x").partial == 0.0
    assert score(sample, "(1234567)").exact
    vartrack = _sample("vartrack", ("QWERT",))
    assert score(vartrack, "QWERTY").partial == 0.0 and not score(vartrack, "QWERTY").exact


def test_score_partial_credit_ignores_extras():
    multivalue = _sample("multivalue", ("1111111", "2222222", "3333333"), ("4444444",))
    assert score(multivalue, "1111111 and 3333333").partial == pytest.approx(2 / 3)
    assert score(multivalue, "3333333, 2222222, 1111111").exact
    extra = score(multivalue, "3333333, 2222222, 1111111, 4444444")
    assert extra.partial == 1.0 and not extra.exact and extra.found == ("1111111", "2222222", "3333333", "4444444")
    cwe = _sample("cwe", ("bako", "mire", "tusa", "zelo", "nipa"))
    assert score(cwe, "bako, mire, tusa, bakomi").partial == pytest.approx(3 / 5)


def test_score_rejects_non_string():
    with pytest.raises(ValueError, match="output must be a str"):
        score(_sample("passkey", ("1",)), None)
