"""Output for people and for scripts: rich text on stderr, `--json` results on stdout, quiet mode."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


@dataclass
class UI:
    quiet: bool = False
    json_output: bool = False

    def __post_init__(self):
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}")

    def result(self, payload: dict, human: str | None = None) -> None:
        """The command's result: JSON on stdout with --json, else a human line (unless quiet)."""
        if self.json_output:
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif human and not self.quiet:
            Console(highlight=False, soft_wrap=True).print(human)

    @contextmanager
    def progress(self, description: str, total: int | None):
        """Yields advance(n=1); a rich bar only when interactive and not quiet."""
        if self.quiet or not _interactive():
            yield lambda n=1: None
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


QUIET_UI = UI(quiet=True)
