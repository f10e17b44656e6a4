"""Shared-context tasks: several questions over one long context, as a server with a prefix cache
meets them (in the spirit of SCBench's multi-turn and multi-request modes).

One context holds ``KEYS`` "special magic number" facts at spread depths, plus answer-shaped
filler numbers. ``QUESTIONS`` of the keys are asked, in a shuffled order:

* ``multiturn``: turn ``t``'s prompt is turn ``t-1``'s prompt, then that turn's gold answer, then
  the next question. Every turn's prompt starts with the previous one, so with the engine's prefix
  cache every later turn runs on cached KV; turns of one conversation run one after another.
* ``sharedctx``: one request per question, each ``context + question``, all sharing the context
  and sent together.

Scoring is strict: every other key's value (including the answers already given in earlier
turns) is a listed distractor. A method that compresses or selects against the first question
and loses what later questions need shows it here, turn by turn.
"""
from __future__ import annotations

import random

from .tasks import (
    MIN_FILLER_SENTENCES,
    Sample,
    Tokenizer,
    _distinct,
    _fit,
    _KEY_ANIMALS,
    _KEY_COLOURS,
    _Layout,
    _magic,
    _numeric_distractors,
    _place_chain,
    _SentencePool,
)

TASKS = ("multiturn", "sharedctx")
KEYS = 6  # facts in the context
QUESTIONS = 4  # of them asked (the other facts are distractors)
ANSWER_TOKENS = 24
#: What the turns after the first add to the prompt (question + gold answer, about 30 tokens each).
EXTRA_PROMPT_TOKENS = {"multiturn": 48 * (QUESTIONS - 1), "sharedctx": 0}

HEADER = ("Special magic numbers are hidden inside the long text below. Remember all of them; "
          "you will be asked about several of them, one at a time.\n\n")


def _question(key: str) -> str:
    return f"What is the special magic number for {key}? The special magic number for {key} is"


def conversation(task: str, target_tokens: int, seed: int, tokenizer: Tokenizer) -> list[Sample]:
    """The ``QUESTIONS`` samples of one conversation (``multiturn``) or one shared context
    (``sharedctx``); the context is fitted so the first prompt has about ``target_tokens`` tokens.
    Each sample's ``turn`` is its question's index; ``group`` (the seed) ties a conversation's
    turns together so they run in order."""
    if task not in TASKS:
        raise ValueError(f"unknown shared-context task {task!r}; expected one of {TASKS}")
    rng = random.Random(seed)
    keys = _distinct(lambda: f"{rng.choice(_KEY_COLOURS)}-{rng.choice(_KEY_ANIMALS)}", KEYS, set())
    values = _distinct(lambda: str(rng.randint(1_000_000, 9_999_999)), KEYS, set())
    depths = [(i + 0.5) / KEYS for i in range(KEYS)]
    rng.shuffle(depths)
    asked = list(range(QUESTIONS))
    rng.shuffle(asked)
    numbers, filler_numbers = _numeric_distractors(rng, 0.5, 7, set(values))
    pool = _SentencePool(rng)

    def context(n: int) -> str:
        pieces = list(pool.take(n))
        for chain, d in numbers:
            _place_chain(pieces, chain, d)
        for k, v, d in zip(keys, values, depths):
            _place_chain(pieces, (_magic(k, v),), d)
        return " ".join(pieces)

    def first(n: int) -> _Layout:
        text = context(n)
        prompt = f"{HEADER}{text}\n\n{_question(keys[asked[0]])}"
        return _Layout(prompt, (values[asked[0]],), 0, (len(HEADER), len(HEADER) + len(text)))

    layout, _ = _fit(first, lambda t: len(tokenizer.encode(t)), task, target_tokens, MIN_FILLER_SENTENCES)
    text = layout.prompt[len(HEADER): layout.context_span[1]]
    samples, history = [], ""
    for turn, i in enumerate(asked):
        prompt = f"{HEADER}{text}\n\n{history}{_question(keys[i])}"  # history stays empty for sharedctx
        if task == "multiturn":
            history += f"{_question(keys[i])} {values[i]}.\n\n"
        wrong = tuple(v for j, v in enumerate(values) if j != i) + filler_numbers
        samples.append(Sample(
            task=task, target_tokens=target_tokens, depth=round(depths[i], 4), seed=seed, prompt=prompt,
            answers=(values[i],), max_tokens=ANSWER_TOKENS,
            needle_char_offset=len(HEADER) + text.index(_magic(keys[i], values[i])),
            prompt_tokens=len(tokenizer.encode(prompt)), context_span=layout.context_span, distractors=wrong,
            turn=turn, group=seed if task == "multiturn" else None))
    return samples
