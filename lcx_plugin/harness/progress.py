"""Progress for long work: a bar with an ETA on a terminal, one line per finished unit elsewhere
(a file, a pipe, CI), never twenty silent minutes."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, label) as p: ... p.advance()``."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, terminal: bool | None = None) -> None:
        """``terminal``: draw the bar even where ``stream`` is not a terminal itself (a child whose
        stream is relayed to one); None: whether ``stream`` is a terminal."""
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.done = 0
        self.t0 = time.perf_counter()
        self._rich = None

    def __enter__(self) -> "Progress":
        if self.terminal:
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._rich = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("eta"), TimeRemainingColumn(), console=Console(file=self.stream, force_terminal=True))
            self._rich.__enter__()
            # Escaped: a label such as "[stock] accuracy" is text, not rich markup (unescaped, the
            # arm's name vanished from its bar).
            self._task = self._rich.add_task(escape(self.label), total=self.total)
        return self

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self._rich is not None:
            self._rich.advance(self._task, n)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"{self.label}: {self.done}/{self.total} done, {elapsed:.0f} s elapsed, eta {eta:.0f} s"
              + (f" ({note})" if note else ""), file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
