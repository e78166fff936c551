"""Every `diffpro <command> --option` that README.md and docs/ show must exist: a renamed or dropped
option left in the docs is what a new user copies first, and it fails with "No such option"."""

import re
from pathlib import Path

import typer

from diffpro_cli.app import app

ROOT = Path(__file__).resolve().parents[1]
INVOCATION = re.compile(r"(?:^|[\s`(])(?:diffpro|-m diffpro_cli) ([a-z][a-z-]*)([^`\n#|]*)")
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def _spans(text: str):
    """(line number, text) of every code line (backslash continuations joined) and inline code span."""
    in_code, pending = False, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            in_code, pending = not in_code, None
            continue
        if not in_code:
            yield from ((number, span) for span in re.findall(r"`([^`]*)`", line))
            continue
        start, joined = pending or (number, "")
        joined += " " + line.rstrip("\\")
        pending = (start, joined) if line.rstrip().endswith("\\") else None
        if pending is None:
            yield start, joined


def _invocations():
    commands = typer.main.get_command(app).commands
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, span in _spans(path.read_text()):
            for m in INVOCATION.finditer(" " + span):
                if m.group(1) in commands:
                    yield f"{path.relative_to(ROOT)}:{number}", commands[m.group(1)], FLAG.findall(m.group(2))


def test_the_docs_show_commands_at_all():
    # catches: the scan silently finding nothing (a changed fence style or regex), which would pass any docs
    found = list(_invocations())
    assert len(found) > 50 and {c.name for _, c, _ in found} >= {"profile", "score", "prune", "allocate", "quantize",
                                                                   "bench", "run", "sample", "export"}


def test_every_option_the_docs_show_exists():
    # catches: docs still showing an option after a rename (e.g. --latency-batch) or one that never existed
    unknown = [f"{where}: diffpro {command.name} has no {flag}" for where, command, flags in _invocations()
               for flag in flags if flag not in {o for p in command.params for o in (*p.opts, *p.secondary_opts)}]
    assert not unknown, "\n".join(unknown)
