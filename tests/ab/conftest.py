"""Shared fixtures for the A/B task and statistics tests."""
from __future__ import annotations

import functools

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's Hugging Face tokenizer (prepared once, locally)."""
    from transformers import AutoTokenizer

    from lcx_plugin.harness.model import prepare

    return AutoTokenizer.from_pretrained(str(prepare()))


@pytest.fixture(scope="session")
def make_sample(tokenizer):
    """``make_sample(task, target_tokens, depth, seed)``, cached so tests share prompts."""
    from lcx_plugin.harness.ab.tasks import generate

    @functools.lru_cache(maxsize=None)
    def make(task: str, target_tokens: int, depth: float, seed: int):
        return generate(task, target_tokens, depth, seed, tokenizer)

    return make
