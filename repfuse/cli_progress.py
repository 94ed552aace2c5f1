"""Progress on stderr, readable by people and in CI logs (never on stdout, never with --quiet).

On a terminal: one live line with a spinner, the stage, and while modules are analysed a bar with
modules done / total and the elapsed time. Elsewhere (a CI log, a pipe): one line per finished stage
with its duration, and while a long stage runs a line at least every `HEARTBEAT_S` seconds saying how far
it is, so a log is never silent for long. Every update also checks for a signal a library swallowed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from . import api
from .cli_common import Signals

HEARTBEAT_S = 10.0


@contextlib.contextmanager
def progress_display(err: Console, quiet: bool, signals: Signals) -> Iterator[api.Progress]:
    """The api's progress callback for this run (see the module docstring)."""
    if quiet:
        def check(message: str) -> None:
            signals.check()

        yield check
        return
    if not err.is_terminal:
        yield _LogLines(err, signals).update
        return
    columns = (SpinnerColumn(), TextColumn("repfuse: {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(message: str) -> None:
            signals.check()
            step = message if isinstance(message, api.Step) else None
            if step is not None and step.seconds is not None:
                return  # a stage finished: the next one names itself
            total = step.total if step is not None else None
            done = step.done if step is not None else None
            bar.update(task, description=escape(str(message)), total=total, completed=done or 0)

        yield update


class _LogLines:
    """Without a terminal: a line per finished stage (with its duration) and a heartbeat in long ones."""

    def __init__(self, err: Console, signals: Signals) -> None:
        self.err, self.signals = err, signals
        self.last = time.monotonic()

    def _print(self, text: str) -> None:
        self.err.print(f"repfuse: {text}", markup=False, highlight=False, soft_wrap=True)
        self.last = time.monotonic()

    def update(self, message: str) -> None:
        self.signals.check()
        step = message if isinstance(message, api.Step) else None
        if step is None:
            return
        if step.seconds is not None:
            self._print(f"{step} ({step.seconds:.1f} s)")
        elif step.total and time.monotonic() - self.last >= HEARTBEAT_S:
            self._print(f"{step} {step.done}/{step.total}")
