"""Output for people and for scripts: rich text on stderr, `--json` results on stdout, quiet mode.

Progress: rich bars and spinners on a TTY; when stderr is not a TTY (CI logs, nohup, `make demo > log`)
one plain line at most every DIFFPRO_PROGRESS_INTERVAL seconds (default 30) and one at the end, so a
long phase is never silent; `--quiet` silences both.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.errors import LiveError
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


PROGRESS_INTERVAL_ENV = "DIFFPRO_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 30.0
WAKE_MARGIN = 0.97   # watchdog threads wake a little early: a busy machine wakes them late


# Warnings libraries print while diffusers imports them, which no diffpro user can act on: with torchao
# installed (the `torchao` extra), torch 2.14 warns about torchao's Enum registrations and diffusers'
# torchao quantizer about tensor classes newer torchao moved. Importing diffpro_cli sets these loggers to error level.
IMPORT_NOISE_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_import_noise() -> None:
    import logging

    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _secs(s: float) -> str:
    return f"{s:.0f}s"


def _interval_from_env() -> float:
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_PROGRESS_INTERVAL
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL


@dataclass
class UI:
    quiet: bool = False
    json_output: bool = False
    # seconds between plain progress lines when not a TTY (None: $DIFFPRO_PROGRESS_INTERVAL, else 30)
    progress_interval: float | None = None
    # None: detect (stderr is a TTY and $CI unset); True/False forces rich or plain progress
    interactive: bool | None = None

    def __post_init__(self):
        # messages carry user text (specs like pkg:factory:, paths, [flag lists]): printed as given, never
        # read as rich markup or :emoji: codes; warn() styles only its own prefix
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)
        self.last_line = time.monotonic()   # when this UI last printed a line (progress watchdogs count from it)

    def _is_interactive(self) -> bool:
        return _interactive() if self.interactive is None else self.interactive

    def _interval(self) -> float:
        return _interval_from_env() if self.progress_interval is None else max(0.0, float(self.progress_interval))

    def _plain(self, line: str) -> None:
        self.err.print(line, markup=False, highlight=False)
        self.last_line = time.monotonic()

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message)
            self.last_line = time.monotonic()

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True)
        self.last_line = time.monotonic()

    def result(self, payload: dict, human: str | None = None) -> None:
        """The command's result: JSON on stdout with --json, else a human line (unless quiet)."""
        if self.json_output:
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif human and not self.quiet:
            Console(highlight=False, soft_wrap=True, markup=False, emoji=False).print(human)

    @contextmanager
    def progress(self, description: str, total: int | None):
        """Yields advance(n=1). TTY: a rich bar. Not a TTY: a plain line `<description>: done/total (pct%),
        elapsed Xs, ETA Ys` at most every progress interval, and one when the block ends. Quiet: nothing."""
        if self.quiet:
            yield lambda n=1: None
            return
        if not self._is_interactive():
            plain = _PlainProgress(self, description, total, self._interval())
            stop = threading.Event()
            watchdog = None
            if plain.interval > 0:   # a step longer than the interval must not leave the log silent
                watchdog = threading.Thread(target=plain.keep_alive, args=(stop,), name="diffpro-progress", daemon=True)
                watchdog.start()
            try:
                yield plain.advance
            finally:
                stop.set()
                if watchdog is not None:
                    watchdog.join()
            plain.finish()
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        bar = Progress(*columns, console=self.err, transient=True)
        try:
            bar.start()
        except LiveError:       # inside another live display (a heartbeat spinner): that one shows liveness
            yield lambda n=1: None
            return
        try:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        finally:
            bar.stop()

    @contextmanager
    def heartbeat(self, description: str):
        """For a long phase with no known total. Not a TTY: a daemon thread prints `<description>: still
        working, elapsed Xs` every progress interval until the block ends. TTY: a rich spinner. Quiet: nothing."""
        if self.quiet:
            yield
            return
        if self._is_interactive():
            spinner = self.err.status(description)
            try:
                spinner.start()
            except LiveError:   # inside a progress bar, which already shows liveness
                spinner = None
            try:
                yield
            finally:
                if spinner is not None:
                    spinner.stop()
            return
        stop = threading.Event()
        t0 = time.monotonic()
        interval = max(self._interval() * WAKE_MARGIN, 0.01)   # an interval of 0 must not spin

        def beat():
            while not stop.wait(interval):
                self._plain(f"{description}: still working, elapsed {_secs(time.monotonic() - t0)}")

        thread = threading.Thread(target=beat, name="diffpro-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


class _PlainProgress:
    """Throttled plain-text progress for logs (see UI.progress)."""

    def __init__(self, ui: UI, description: str, total: int | None, interval: float):
        self.ui, self.description, self.total, self.interval = ui, description, total, interval
        self.done = 0
        self.printed = None      # `done` at the last printed line
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        if not self.total:
            return f"{self.description}: {self.done} done, elapsed {_secs(elapsed)}"
        pct = 100.0 * self.done / self.total
        if self.done >= self.total:
            eta = "0s"
        elif self.done > 0:
            eta = _secs(elapsed * (self.total - self.done) / self.done)
        else:
            eta = "?"
        return f"{self.description}: {self.done}/{self.total} ({pct:.0f}%), elapsed {_secs(elapsed)}, ETA {eta}"

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if now - self.last < self.interval:
                return
            self.last, self.printed = now, self.done
            text = self.line(now)
        self.ui._plain(text)

    def keep_alive(self, stop: threading.Event) -> None:
        """Until `stop`: the current line again whenever `interval` passed since the UI's last line, this
        block's or any other (a round of work can outlast the interval, e.g. a timing round of a large model,
        and advance() only prints when it is called; the work before the block's first round counts too)."""
        interval = self.interval * WAKE_MARGIN
        while True:
            with self.lock:
                wait = interval - (time.monotonic() - self.ui.last_line)
            if stop.wait(max(wait, 0.05)):
                return
            with self.lock:
                now = time.monotonic()
                if now - self.ui.last_line < interval:
                    continue
                self.last, self.printed = now, self.done
                text = self.line(now)
            self.ui._plain(text)

    def finish(self) -> None:
        """The closing line (not printed when the block raised: the error says what happened)."""
        if self.done != self.printed:
            self.ui._plain(self.line(time.monotonic()))


QUIET_UI = UI(quiet=True)


@contextmanager
def native_stdout_silenced():
    """Discard what native code writes to file descriptor 1 inside the block: scipy's HiGHS prints
    stray debug lines (e.g. "HighsMipSolverData::transformNewIntegerFeasibleSolution") straight to the
    process's stdout, which would corrupt `--json` output read by scripts."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:          # no fd 1 (e.g. a closed stdout): nothing to protect
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
