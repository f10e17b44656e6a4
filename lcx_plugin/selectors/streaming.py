"""``streaming``: attention sinks plus a recent window on every head (StreamingLLM).

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453. Each query sees the first ``sink`` tokens and the ``window``
tokens up to and including itself; everything between is skipped. Contexts no longer than
``sink + window`` (or shorter than ``min_context``) are dense. This is the honest baseline a
head split has to beat: it forgets whatever falls between the sinks and the window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lcx_plugin.kernels.paged import Selection

from . import register
from .base import SelectContext, WindowedSelector


@register
@dataclass(frozen=True)
class Streaming(WindowedSelector):
    """Attention sinks plus a recent window on every head (StreamingLLM).

    sink: tokens kept at the start; window: recent tokens per query (its own included);
    min_context: contexts shorter than this stay dense; extrapolate: compacted positions (sinks
    right before the window), for prompts past the trained length.
    """

    name: ClassVar[str] = "streaming"
    no_extrapolation: ClassVar[str | None] = None  # sinks + window at every row, prefill included
    short_context_example: ClassVar[dict] = {"sink": 16, "window": 128}
    window_only: ClassVar[bool] = True

    def select(self, ctx: SelectContext) -> Selection:
        return self.shared_window_selection(ctx)
