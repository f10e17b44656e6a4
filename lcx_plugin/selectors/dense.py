"""``dense``: every cached token, as the stock backend attends. The default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import register
from .base import SelectContext, Selector


@register
@dataclass(frozen=True)
class Dense(Selector):
    """Full attention over every cached token: the stock backend's arithmetic, token-identical to it
    where lcx drives the engine's own op (vLLM CPU)."""

    name: ClassVar[str] = "dense"
    short_context_example: ClassVar[dict] = {}

    def select(self, ctx: SelectContext) -> None:
        return None
