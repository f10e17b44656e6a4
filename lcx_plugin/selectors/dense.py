"""``dense``: every cached token, as the stock backend attends. The default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import register
from .base import SelectContext, Selector


@register
@dataclass(frozen=True)
class Dense(Selector):
    """Full attention; token-identical to the engine's own backend where lcx drives its op."""

    name: ClassVar[str] = "dense"

    def select(self, ctx: SelectContext) -> None:
        return None
