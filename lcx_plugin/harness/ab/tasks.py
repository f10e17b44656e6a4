"""Deterministic long-context tasks for A/B runs of the lcx attention methods.

Everything is generated locally from small word lists and ``random.Random(seed)`` (no global
RNG, no dataset download), so the same ``(task, target_tokens, depth, seed)`` always yields the
same prompt. Five tasks probe retrieval over a long context:

* ``passkey``    - one 5-digit pass key hidden in filler text at ``depth``.
* ``multikey``   - several "special magic number" key/value needles; only the one at ``depth``
                   is asked for, the others are distractors at other depths.
* ``multivalue`` - one key with several values; the first at ``depth``, the rest shortly after it;
                   all values are asked for.
* ``vartrack``   - a chain of variable assignments (``VAR A = 12345``, ``VAR B = VAR A``, ...)
                   starting at ``depth``, plus a distractor chain; all variables of the asked
                   chain are the answers.
* ``cwe``        - common-word extraction from a numbered word list; ``depth`` is accepted and
                   recorded but has no meaning for this task.

A prompt is ``header + context + "\\n\\n" + question``; the question ends with an answer prefix
("... The pass key is") so that even a small instruct model can complete it. ``depth`` is the
relative character position (0 = start, 1 = end) of the (first) needle inside the context.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

TASKS = ("passkey", "multikey", "multivalue", "vartrack", "cwe")
#: Several questions over one context (``shared_context.py``); asked for by name, not in the default set.
SHARED_CONTEXT_TASKS = ("multiturn", "sharedctx")
KNOWN_TASKS = TASKS + SHARED_CONTEXT_TASKS

#: Generation budget (new tokens) that each task's answer needs.
MAX_TOKENS = {"passkey": 16, "multikey": 24, "multivalue": 64, "vartrack": 48, "cwe": 64, "multiturn": 24,
              "sharedctx": 24}

MULTIKEY_KEYS = 4  # one asked key + three distractors
NUMERIC_DISTRACTORS = 3  # filler sentences carrying a number shaped like the answer
MULTIVALUE_VALUES = 3
VARTRACK_HOPS = 3  # variable-to-variable assignments: the chain has VARTRACK_HOPS + 1 names
CWE_COMMON_WORDS = 5
FOLLOWER_SPREAD = 0.1  # chain items after the first spread over this fraction of what follows
DISTRACTOR_MIN_GAP = 0.15  # distractors keep at least this depth distance from the asked needle
MIN_FILLER_SENTENCES = 8
MIN_CWE_ENTRIES = 40
_PROBE_UNITS = 64  # extra sentences/entries used once to estimate tokens per unit
_MAX_FIT_ROUNDS = 6


class Tokenizer(Protocol):
    """Anything with a Hugging Face style ``encode(text) -> list[int]``."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    """One generated prompt and what a correct answer must contain.

    ``needle_char_offset`` is the character offset in ``prompt`` where the (first) needle
    sentence starts; for ``cwe`` it is the start of the first list line holding a frequent word.
    ``context_span`` is the ``[start, end)`` character range of the context (filler and needles,
    or the word list) inside ``prompt``. ``prompt_tokens`` is ``len(tokenizer.encode(prompt))``.
    ``max_tokens`` is the generation budget the answer needs. ``distractors`` are the planted
    answer-shaped items that are not the answer (other keys' values, numbers in the filler, the
    other variable chain, the rare words): an output that names one is wrong.
    """

    task: str
    target_tokens: int
    depth: float
    seed: int
    prompt: str
    answers: tuple[str, ...]
    max_tokens: int
    needle_char_offset: int
    prompt_tokens: int
    context_span: tuple[int, int]
    distractors: tuple[str, ...] = ()
    turn: int = 0  # the question's index in a shared-context task (0 otherwise)
    group: int | None = None  # samples of one group run one after another, in order (a conversation)


@dataclass(frozen=True)
class _Layout:
    """A built prompt before token counting."""

    prompt: str
    answers: tuple[str, ...]
    needle_char_offset: int
    context_span: tuple[int, int]
    distractors: tuple[str, ...] = ()


@dataclass(frozen=True)
class _NeedleSpec:
    """What a needle task hides: ``chain`` starts at the requested depth, item 0 first;
    each distractor chain is ``(texts, start_depth)``."""

    header: str
    question: str
    chain: tuple[str, ...]
    distractors: tuple[tuple[tuple[str, ...], float], ...]
    answers: tuple[str, ...]
    wrong: tuple[str, ...] = ()  # the distractors' answer-shaped values


# --------------------------------------------------------------------------- word lists

_NAMES = ["Mara", "Tobin", "Ilse", "Corwin", "Nadia", "Ferris", "Odette", "Lukas", "Priya", "Emmett"]
_ADJECTIVES = ["quiet", "narrow", "golden", "dusty", "patient", "bright", "crooked", "gentle",
               "heavy", "distant", "curious", "silver", "hollow", "careful", "ancient", "windy"]
_NOUNS = ["lantern", "orchard", "bridge", "notebook", "harbour", "workshop", "meadow", "kettle",
          "tower", "market", "garden", "ladder", "compass", "river", "cottage", "engine", "village",
          "library", "wagon", "chapel"]
_PLACES = ["the valley", "the old mill", "the northern road", "the square", "the hillside",
           "the station", "the riverbank", "the courtyard", "the forest edge", "the pier"]
_PAST_VERBS = ["painted", "repaired", "carried", "studied", "described", "visited", "measured",
               "cleaned", "followed", "sketched", "admired", "moved"]
_PRESENT_VERBS = ["watches", "guards", "remembers", "shelters", "overlooks", "outlasts", "echoes"]
_TIMES = ["at dawn", "every spring", "in the evening", "before the rain", "after supper",
          "during the fair", "on quiet mornings", "late in autumn"]
_KEY_COLOURS = ["amber", "cobalt", "crimson", "ivory", "jade", "ochre", "scarlet", "teal",
                "violet", "umber", "saffron", "slate"]
_KEY_ANIMALS = ["falcon", "otter", "heron", "lynx", "badger", "marten", "osprey", "wren",
                "bison", "gecko", "ibis", "stoat"]
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"The {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} stood near {r.choice(_PLACES)} {r.choice(_TIMES)}.",
    lambda r: f"{r.choice(_NAMES)} {r.choice(_PAST_VERBS)} a {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} by {r.choice(_PLACES)}.",
    lambda r: f"Somewhere past {r.choice(_PLACES)}, the {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} {r.choice(_PRESENT_VERBS)} the {r.choice(_NOUNS)}.",
    lambda r: f"{r.choice(_TIMES).capitalize()}, {r.choice(_NAMES)} and {r.choice(_NAMES)} {r.choice(_PAST_VERBS)} the {r.choice(_NOUNS)}.",
    lambda r: f"Nobody knew why the {r.choice(_NOUNS)} by {r.choice(_PLACES)} looked so {r.choice(_ADJECTIVES)}.",
    lambda r: f"A {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} {r.choice(_PRESENT_VERBS)} {r.choice(_PLACES)} and the {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} beyond it.",
)


def _sentence(rng: random.Random) -> str:
    """One filler sentence (no digits, no needle vocabulary)."""
    return rng.choice(_TEMPLATES)(rng)


class _SentencePool:
    """Filler sentences drawn lazily from ``rng``; ``take(n)`` is always the same prefix."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._sentences: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._sentences) < n:
            self._sentences.append(_sentence(self._rng))
        return self._sentences[:n]


def _pseudo_word(rng: random.Random) -> str:
    """A pronounceable lowercase non-word of 2-3 consonant-vowel syllables, e.g. ``"bakomi"``."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _distinct(draw: Callable[[], str], n: int, taken: set[str]) -> list[str]:
    """``n`` new values from ``draw`` that are not in ``taken`` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        value = draw()
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _far_depth(rng: random.Random, depth: float) -> float:
    """A uniform depth at least ``DISTRACTOR_MIN_GAP`` away from ``depth``."""
    while True:
        d = rng.random()
        if abs(d - depth) >= DISTRACTOR_MIN_GAP:
            return d


# --------------------------------------------------------------------------- needle specs

_NUMBER_TEMPLATES = (
    "Room {n} at {place} stayed {adj} all week.",
    "The {noun} was entered in the ledger as item {n}.",
    "{name} wrote the number {n} on a {adj} card.",
)


def _numeric_distractors(rng: random.Random, depth: float, digits: int, taken: set[str]
                         ) -> tuple[tuple[tuple[tuple[str, ...], float], ...], tuple[str, ...]]:
    """``NUMERIC_DISTRACTORS`` filler sentences, each with a fresh ``digits``-digit number, placed away
    from ``depth``: the answer is not the only number of its shape in the context."""
    numbers = _distinct(lambda: str(rng.randint(10 ** (digits - 1), 10 ** digits - 1)), NUMERIC_DISTRACTORS, taken)
    chains = tuple(((rng.choice(_NUMBER_TEMPLATES).format(
        n=n, place=rng.choice(_PLACES), adj=rng.choice(_ADJECTIVES), noun=rng.choice(_NOUNS), name=rng.choice(_NAMES)),),
        _far_depth(rng, depth)) for n in numbers)
    return chains, tuple(numbers)

def _magic(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def _passkey_spec(rng: random.Random, depth: float) -> _NeedleSpec:
    key = str(rng.randint(10000, 99999))
    numbers, wrong = _numeric_distractors(rng, depth, 5, {key})
    return _NeedleSpec(
        header="A pass key is hidden somewhere inside the long text below. Find it and remember it.\n\n",
        question="What is the pass key? The pass key is",
        chain=(f"Important: the pass key is {key}. Keep {key} in mind.",),
        distractors=numbers,
        answers=(key,),
        wrong=wrong,
    )


def _multikey_spec(rng: random.Random, depth: float) -> _NeedleSpec:
    keys = _distinct(lambda: f"{rng.choice(_KEY_COLOURS)}-{rng.choice(_KEY_ANIMALS)}", MULTIKEY_KEYS, set())
    values = _distinct(lambda: str(rng.randint(1_000_000, 9_999_999)), MULTIKEY_KEYS, set())
    distractors = tuple(((_magic(k, v),), _far_depth(rng, depth)) for k, v in zip(keys[1:], values[1:]))
    numbers, wrong = _numeric_distractors(rng, depth, 7, set(values))
    return _NeedleSpec(
        header="Special magic numbers are hidden inside the long text below. Remember them; "
               "you will be asked about one of them.\n\n",
        question=f"What is the special magic number for {keys[0]}? "
                 f"The special magic number for {keys[0]} is",
        chain=(_magic(keys[0], values[0]),),
        distractors=distractors + numbers,
        answers=(values[0],),
        wrong=tuple(values[1:]) + wrong,
    )


def _multivalue_spec(rng: random.Random, depth: float) -> _NeedleSpec:
    key = f"{rng.choice(_KEY_COLOURS)}-{rng.choice(_KEY_ANIMALS)}"
    values = _distinct(lambda: str(rng.randint(1_000_000, 9_999_999)), MULTIVALUE_VALUES, set())
    numbers, wrong = _numeric_distractors(rng, depth, 7, set(values))
    return _NeedleSpec(
        header=f"Several special magic numbers for {key} are hidden inside the long text below. "
               "Remember all of them.\n\n",
        question=f"What are all the special magic numbers for {key}? "
                 f"The special magic numbers for {key} are",
        chain=tuple(_magic(key, v) for v in values),
        distractors=numbers,
        answers=tuple(values),
        wrong=wrong,
    )


def _var_chain(names: Sequence[str], value: str) -> tuple[str, ...]:
    first = f"VAR {names[0]} = {value}."
    return (first, *(f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])))


def _vartrack_spec(rng: random.Random, depth: float) -> _NeedleSpec:
    n = VARTRACK_HOPS + 1
    names = _distinct(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), 2 * n, set())
    values = _distinct(lambda: str(rng.randint(10000, 99999)), 2, set())
    return _NeedleSpec(
        header="Variable assignments are hidden inside the long text below. Keep track of them.\n\n",
        question=f"Which variables are assigned the value {values[0]}, directly or through other "
                 f"variables? The variables equal to {values[0]} are:",
        chain=_var_chain(names[:n], values[0]),
        distractors=((_var_chain(names[n:], values[1]), _far_depth(rng, depth)),),
        answers=tuple(names[:n]),
        wrong=tuple(names[n:]),
    )


_SPECS: dict[str, Callable[[random.Random, float], _NeedleSpec]] = {
    "passkey": _passkey_spec,
    "multikey": _multikey_spec,
    "multivalue": _multivalue_spec,
    "vartrack": _vartrack_spec,
}


# --------------------------------------------------------------------------- needle placement

def _prefix_lengths(pieces: Sequence[str]) -> list[int]:
    """``out[b]`` = length of ``" ".join(pieces[:b])``, for boundaries ``b = 0..len(pieces)``."""
    out = [0]
    for i, piece in enumerate(pieces):
        out.append(out[-1] + len(piece) + (1 if i else 0))
    return out


def _insert_at_depth(pieces: list[str], text: str, depth: float, lo: int = 0, hi: int | None = None) -> int:
    """Insert ``text`` at the boundary in ``[lo, hi]`` whose relative char position in
    ``" ".join(pieces)`` is closest to ``depth``; return the index it now has."""
    hi = len(pieces) if hi is None else hi
    prefix = _prefix_lengths(pieces)
    total = max(prefix[-1], 1)
    best = min(range(lo, hi + 1), key=lambda b: (abs(prefix[b] / total - depth), b))
    pieces.insert(best, text)
    return best


def _place_chain(pieces: list[str], chain: Sequence[str], depth: float) -> int:
    """Place ``chain`` in order: item 0 at ``depth``, later items after it, spread over
    ``FOLLOWER_SPREAD`` of the remaining text. Item 0 is placed last, against the text that
    already holds every other needle, so its depth is exact up to one sentence. Returns the
    index of item 0."""
    follower_idx: list[int] = []
    lo = 0
    for j, text in enumerate(chain[1:], start=1):
        d = depth + (1.0 - depth) * FOLLOWER_SPREAD * j / (len(chain) - 1)
        idx = _insert_at_depth(pieces, text, d, lo=lo)
        follower_idx = [i + 1 if i >= idx else i for i in follower_idx] + [idx]
        lo = idx + 1
    hi = follower_idx[0] if follower_idx else None
    return _insert_at_depth(pieces, chain[0], depth, hi=hi)


def _assemble(header: str, context: str, question: str) -> tuple[str, tuple[int, int]]:
    """Prompt text and the ``[start, end)`` span of ``context`` in it."""
    prompt = f"{header}{context}\n\n{question}"
    return prompt, (len(header), len(header) + len(context))


def _needle_layout(spec: _NeedleSpec, sentences: Sequence[str], depth: float) -> _Layout:
    """Filler ``sentences`` with the spec's distractors and chain inserted."""
    pieces = list(sentences)
    for chain, d in spec.distractors:
        _place_chain(pieces, chain, d)
    anchor = _place_chain(pieces, spec.chain, depth)
    prompt, span = _assemble(spec.header, " ".join(pieces), spec.question)
    offset = span[0] + _prefix_lengths(pieces)[anchor] + (1 if anchor else 0)
    return _Layout(prompt, spec.answers, offset, span, spec.wrong)


# --------------------------------------------------------------------------- common words

def _cwe_layout(seed: int, n_entries: int) -> _Layout:
    """A shuffled numbered list of ``n_entries`` words: ``CWE_COMMON_WORDS`` words repeated
    ``clamp(n_entries // 25, 6, 30)`` times each, the rest rare words appearing 1-3 times."""
    rng = random.Random(seed)
    taken: set[str] = set()
    common = _distinct(lambda: _pseudo_word(rng), CWE_COMMON_WORDS, taken)
    reps = min(30, max(6, n_entries // 25))
    entries = [w for w in common for _ in range(reps)]
    while len(entries) < n_entries:
        word = _distinct(lambda: _pseudo_word(rng), 1, taken)[0]
        entries.extend([word] * min(rng.randint(1, 3), n_entries - len(entries)))
    rng.shuffle(entries)
    lines = [f"{i}. {w}" for i, w in enumerate(entries, start=1)]
    header = "Below is a numbered list of words. A few words occur much more often than the others.\n\n"
    question = (f"Which {CWE_COMMON_WORDS} words occur most often in the list above? "
                f"The {CWE_COMMON_WORDS} most common words are:")
    prompt, span = _assemble(header, "\n".join(lines), question)
    common_set = set(common)
    first = next(i for i, w in enumerate(entries) if w in common_set)
    offset = span[0] + sum(len(line) + 1 for line in lines[:first])
    rare = tuple(sorted(set(entries) - common_set))
    return _Layout(prompt, tuple(common), offset, span, rare)


# --------------------------------------------------------------------------- fitting

def token_tolerance(target_tokens: int) -> float:
    """Allowed ``|prompt_tokens - target_tokens|``: 5% of the target or 32 tokens, whichever is larger."""
    return max(32.0, 0.05 * target_tokens)


def _fit(build: Callable[[int], _Layout], count: Callable[[str], int], task: str,
         target: int, min_units: int) -> tuple[_Layout, int]:
    """Find a unit count (filler sentences or list entries) whose prompt has ``target`` tokens
    within ``token_tolerance``. Tokenizes a small probe twice, then refines with secant steps."""
    base = build(min_units)
    base_tokens = count(base.prompt)
    if target < base_tokens:
        raise ValueError(f"target_tokens={target} is too small for task {task!r}: "
                         f"it needs at least {base_tokens} tokens")
    probe_tokens = count(build(min_units + _PROBE_UNITS).prompt)
    per_unit = max((probe_tokens - base_tokens) / _PROBE_UNITS, 1e-3)
    tol = token_tolerance(target)
    n = min_units + round((target - base_tokens) / per_unit)
    layout, tokens = base, base_tokens
    for _ in range(_MAX_FIT_ROUNDS):
        layout = build(n)
        tokens = count(layout.prompt)
        if abs(tokens - target) <= tol:
            return layout, tokens
        if n > min_units:
            per_unit = max((tokens - base_tokens) / (n - min_units), 1e-3)
        n = max(min_units, n + round((target - tokens) / per_unit))
    raise RuntimeError(f"could not fit task {task!r} to target_tokens={target} "
                       f"(last attempt: {tokens} tokens)")


# --------------------------------------------------------------------------- public API

def _check_task(task: object) -> str:
    if task not in KNOWN_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {KNOWN_TASKS}")
    return task  # type: ignore[return-value]


def _check_depth(depth: object) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be a number in [0, 1]")
    return float(depth)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def generate(task: str, target_tokens: int, depth: float, seed: int, tokenizer: Tokenizer) -> Sample:
    """Build one ``task`` prompt of about ``target_tokens`` tokens (``len(tokenizer.encode(prompt))``
    within ``token_tolerance(target_tokens)``), its needle at relative position ``depth`` in the
    context. Same arguments always give the same ``Sample``.

    Raises ``ValueError`` for an unknown task, a depth outside ``[0, 1]``, a non-integer seed, or a
    ``target_tokens`` smaller than the task's minimal prompt.
    """
    task = _check_task(task)
    depth = _check_depth(depth)
    target_tokens = _check_positive_int("target_tokens", target_tokens)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an integer")

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    if task in SHARED_CONTEXT_TASKS:
        raise ValueError(f"task {task!r} has several samples per context: use shared_context.conversation")
    if task == "cwe":
        layout, tokens = _fit(lambda n: _cwe_layout(seed, n), count, task, target_tokens, MIN_CWE_ENTRIES)
    else:
        rng = random.Random(seed)
        spec = _SPECS[task](rng, depth)
        pool = _SentencePool(rng)
        layout, tokens = _fit(lambda n: _needle_layout(spec, pool.take(n), depth), count, task,
                              target_tokens, MIN_FILLER_SENTENCES)
    return Sample(task=task, target_tokens=target_tokens, depth=depth, seed=seed, prompt=layout.prompt,
                  answers=layout.answers, max_tokens=MAX_TOKENS[task],
                  needle_char_offset=layout.needle_char_offset, prompt_tokens=tokens,
                  context_span=layout.context_span, distractors=layout.distractors)


def derive_seed(seed: int, task: str, target_tokens: int, depth: float, index: int) -> int:
    """A 63-bit seed for one grid cell sample, stable across runs and independent of the rest
    of the grid (so the same cell gets the same prompt in every A/B run)."""
    key = f"{seed}|{task}|{target_tokens}|{float(depth)!r}|{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def max_usable_length(max_context: int, answer_tokens: int) -> int:
    """Largest ``target_tokens`` whose prompt (at most ``target + token_tolerance(target)``
    tokens) plus ``answer_tokens`` generated tokens fits in ``max_context``."""
    budget = max_context - answer_tokens
    length = budget - 32 if budget <= 672 else math.floor(budget / 1.05)
    while length > 0 and length + token_tolerance(length) > budget:
        length -= 1
    return max(length, 0)


def _unique(name: str, values: Sequence[object]) -> None:
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={list(values)!r} contains duplicates")


def build_grid(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
               samples_per_cell: int, seed: int, tokenizer: Tokenizer,
               max_context: int | None = None) -> list[Sample]:
    """The cartesian grid ``tasks x lengths x depths x range(samples_per_cell)``, in that nesting
    order, each sample with its own ``derive_seed``. Same arguments give an identical list.

    ``cwe`` ignores depth, so its cells differ only by seed. A shared-context task ignores depth too
    and gives ``samples_per_cell`` contexts per length, each as its questions' samples, in order.
    With ``max_context`` set, every length
    must leave room for the prompt tolerance and the largest answer budget among ``tasks``;
    otherwise ``ValueError`` reports the largest usable length.
    """
    _unique("tasks", tasks)
    _unique("lengths", lengths)
    _unique("depths", depths)
    for task in tasks:
        _check_task(task)
    for length in lengths:
        _check_positive_int("length", length)
    for depth in depths:
        _check_depth(depth)
    _check_positive_int("samples_per_cell", samples_per_cell)
    if max_context is not None:
        _check_lengths_fit(tasks, lengths, _check_positive_int("max_context", max_context))
    from .shared_context import conversation

    out: list[Sample] = []
    for task in tasks:
        for length in lengths:
            if task in SHARED_CONTEXT_TASKS:
                for i in range(samples_per_cell):
                    out += conversation(task, length, derive_seed(seed, task, length, 0.0, i), tokenizer)
                continue
            out += [generate(task, length, depth, derive_seed(seed, task, length, depth, i), tokenizer)
                    for depth in depths for i in range(samples_per_cell)]
    return out


def _check_lengths_fit(tasks: Sequence[str], lengths: Sequence[int], max_context: int) -> None:
    from .shared_context import EXTRA_PROMPT_TOKENS

    answer = max(MAX_TOKENS[t] + EXTRA_PROMPT_TOKENS.get(t, 0) for t in tasks)
    usable = max_usable_length(max_context, answer)
    too_long = [n for n in lengths if n > usable]
    if too_long:
        raise ValueError(f"lengths {too_long} do not fit max_context={max_context}: prompts may reach "
                         f"length + max(32, 5%) tokens and answers need {answer}; "
                         f"the largest usable length is {usable}")


#: What an answer looks like, per task: any such token in an output is a candidate answer.
#: (cwe's candidates are the list's own words, in ``Sample.distractors`` and ``answers``.)
ANSWER_SHAPES = {"passkey": r"\d{5}", "multikey": r"\d{7}", "multivalue": r"\d{7}", "vartrack": r"[A-Z]{5}",
                 "multiturn": r"\d{7}", "sharedctx": r"\d{7}"}


@dataclass(frozen=True)
class Score:
    """``exact``: the candidate answers found in the output are exactly the expected set (a
    distractor, or any other answer-shaped token, makes it wrong). ``partial``: the fraction of
    expected answers found, extras ignored."""

    exact: bool
    partial: float
    found: tuple[str, ...]


def _whole(token: str, flags: int = 0) -> re.Pattern[str]:
    """Whole-token match: no letter or digit directly before or after."""
    return re.compile(rf"(?<![A-Za-z0-9]){token}(?![A-Za-z0-9])", flags)


def _norm(text: str) -> str:
    return text if text.isdigit() else text.lower()


def score(sample: Sample, output: str) -> Score:
    """Score ``output`` against ``sample``. Numbers match exactly; words ignore case; ``"123"`` does
    not match inside ``"91234"``. Candidates are every answer-shaped token of the output (5-digit
    numbers for passkey, 7-digit for multikey/multivalue, 5-capital names for vartrack) plus any
    planted answer or distractor named in it."""
    if not isinstance(output, str):
        raise ValueError(f"output must be a str, got {type(output).__name__}: {output!r}")
    if not sample.answers:
        raise ValueError(f"sample for task {sample.task!r} has no answers")
    found = set()
    for item in (*sample.answers, *sample.distractors):
        flags = 0 if item.isdigit() else re.IGNORECASE
        if _whole(re.escape(item), flags).search(output):
            found.add(_norm(item))
    shape = ANSWER_SHAPES.get(sample.task)
    if shape:
        found.update(_norm(t) for t in _whole(shape).findall(output))
    expected = {_norm(a) for a in sample.answers}
    return Score(exact=found == expected, partial=len(found & expected) / len(expected), found=tuple(sorted(found)))
