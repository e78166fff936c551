"""Audit 16, the model families end to end as a new user (docs/families/*.md followed literally on tiny
in-process pipelines): one regression test per defect found."""

import re
from pathlib import Path

import typer

from diffpro_cli.app import app

ROOT = Path(__file__).resolve().parents[1]


# --- the family recipes ------------------------------------------------------------------------------


def _recipe_commands(path: Path):
    """(line, command name, argument words) of every `diffpro ...` line in a family doc's bash blocks."""
    in_code = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"\s*diffpro\s+([a-z-]+)(.*)", line) if in_code else None
        if m:
            yield number, m.group(1), m.group(2).split("#")[0].split()


def test_family_recipes_pass_the_model_only_where_the_command_takes_one():
    """Catches: every family recipe ran `diffpro allocate "$PIPE" ...`, whose one argument is scores.json, so
    a new user's allocate stopped with '<pipeline>: no such file' and quantize/sample/export after it
    failed in turn (allocate reads the model from the workdir that profile made)."""
    commands = typer.main.get_command(app).commands
    wrong = []
    for doc in sorted((ROOT / "docs" / "families").glob("*.md")):
        for number, name, words in _recipe_commands(doc):
            args = [p.name for p in commands[name].params if p.param_type_name == "argument"]
            if '"$PIPE"' in words and args[:1] != ["model"]:
                wrong.append(f"{doc.name}:{number}: diffpro {name} takes {args}, not the pipeline")
    assert not wrong, "\n".join(wrong)
