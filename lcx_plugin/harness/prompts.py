"""Deterministic prompts for the demo, the engine tests and the benchmarks.

Long prompts are built from a fixed, seeded vocabulary of plain sentences (no dataset can be
downloaded), with a fact planted inside so that a greedy continuation has something to find.
"""
from __future__ import annotations

import random

SHORT_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "def fibonacci(n):",
    "Q: What is 12 times 7?\nA:",
    "Translate to French: good morning",
    "The three primary colors are",
]

_SUBJECTS = ["The engineer", "A small team", "The old library", "Every server", "The river", "Our cache"]
_VERBS = ["measured", "rebuilt", "described", "watched", "counted", "tested"]
_OBJECTS = ["the quiet harbour", "a long corridor", "the morning light", "three red lanterns", "the final report"]


def filler(n_sentences: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(n_sentences)]


def long_prompt(approx_tokens: int, seed: int = 0, key: str = "7421") -> str:
    """About ``approx_tokens`` tokens of filler with a pass key planted in the middle."""
    sentences = filler(max(1, approx_tokens // 7), seed)
    sentences.insert(len(sentences) // 2, f"The pass key is {key}. Remember it.")
    return " ".join(sentences) + "\nQuestion: what is the pass key? Answer: The pass key is"
