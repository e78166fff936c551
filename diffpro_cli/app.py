"""The `diffpro` command line: a typer app whose commands are thin layers over the stage modules.

Exit codes are stable (see errors.py): 0 ok, 1 internal error, 2 usage / not yet available,
3 bad input, 4 infeasible budget, 5 untrusted code refused, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import typer

from diffpro_cli import __version__
from diffpro_cli.commands.allocate import allocate_cmd
from diffpro_cli.commands.bench import bench_cmd
from diffpro_cli.commands.export import export_cmd
from diffpro_cli.commands.fid_stats import fid_stats_cmd
from diffpro_cli.commands.models import models_cmd
from diffpro_cli.commands.profile import profile_cmd
from diffpro_cli.commands.prune import prune_cmd
from diffpro_cli.commands.quantize import quantize_cmd
from diffpro_cli.commands.run import run_cmd
from diffpro_cli.commands.sample import sample_cmd
from diffpro_cli.commands.score import score_cmd
from diffpro_cli.commands.train import train_cmd
from diffpro_cli.errors import EXIT_INTERRUPTED, DiffproError

app = typer.Typer(
    name="diffpro",
    help="Post-training joint timestep and per-layer precision optimisation for diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

for name, fn in [
    ("profile", profile_cmd), ("score", score_cmd), ("prune", prune_cmd), ("allocate", allocate_cmd),
    ("quantize", quantize_cmd), ("bench", bench_cmd), ("run", run_cmd), ("sample", sample_cmd),
    ("train", train_cmd), ("fid-stats", fid_stats_cmd), ("models", models_cmd), ("export", export_cmd),
]:
    app.command(name)(fn)


def _version(value: bool):
    if value:
        print(f"diffpro {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    """diffpro: profile → score → prune → allocate → quantize → bench (or `run` for all)."""


def _click_exceptions():
    """typer ≥ 0.20 vendors click as typer._click; older typer uses click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions
    return exceptions


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C (temp files removed, one line, exit 130) instead of killing the process
    silently; stage commands and `run` name which of the two it was (commands.common.interruptible)."""
    from diffpro_cli.commands.common import Terminated

    def on_term(signum, frame):
        raise Terminated

    main_thread = threading.current_thread() is threading.main_thread()   # handlers can only be set there
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        yield
    finally:
        if previous is not None:   # None too for a handler set from C: leave it
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Known errors print one line on stderr, never a traceback."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # the one backend choice (headless); plots.py itself needs none
    cx = _click_exceptions()
    command = typer.main.get_command(app)
    try:
        with _sigterm_as_interrupt():
            rv = command.main(args=argv if argv is not None else sys.argv[1:], prog_name="diffpro", standalone_mode=False)
        if rv == EXIT_INTERRUPTED:   # typer turns a KeyboardInterrupt into this return value (not an exception)
            print("error: interrupted; finished artifacts are kept, re-run to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        return 0
    except DiffproError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (typer.Exit, getattr(cx, "Exit", typer.Exit)) as exc:
        return exc.exit_code
    except (typer.Abort, getattr(cx, "Abort", typer.Abort)):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("error: interrupted; finished artifacts are kept, re-run to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except cx.ClickException as exc:   # click's own usage errors (unknown option, bad value): one line too
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "diffpro"
        fix = f"; see '{where} --help'" if isinstance(exc, cx.UsageError) else ""
        print(f"error: {exc.format_message().rstrip('.')}{fix}", file=sys.stderr)
        return exc.exit_code


def cli() -> None:
    sys.exit(main())
