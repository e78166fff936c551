"""Options shared by every subcommand (declare them with these aliases so they read the same)."""

from __future__ import annotations

import functools
import inspect
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffpro_cli.console import UI
from diffpro_cli.errors import EXIT_INTERRUPTED, DiffproError, UsageError

Workdir = Annotated[Path, typer.Option("--workdir", "-w", help="Work directory for artifacts and the lock file.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info lines.")]
Force = Annotated[bool, typer.Option("--force", help="Recompute even if the stage is up to date.")]
Wait = Annotated[bool, typer.Option("--wait", help="If another diffpro process is using the workdir, wait for it instead of exiting with code 2.")]
Seed = Annotated[int, typer.Option("--seed", min=0, max=2 ** 63 - 1, help="Seed for every random choice (recorded in artifacts), 0 to 2**63 - 1.")]
TrustCode = Annotated[bool, typer.Option("--trust-code", help="Allow importing module:factory code and non-weights-only pickles.")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="Weights file for a module:factory model.")]
Conditioning = Annotated[Optional[Path], typer.Option("--conditioning", help="Prompt embeddings (.safetensors/.pt: prompt_embeds, pooled_prompt_embeds, negative_*) or class_labels that every stage calibrates and samples on; text-conditioned models need it.")]
Prompts = Annotated[Optional[Path], typer.Option("--prompts", help="Prompts file (one a line, or a JSON list of strings) encoded once with the pipeline's own text encoders (needs diffpro[text]); instead of --conditioning.")]
NegativePrompt = Annotated[str, typer.Option("--negative-prompt", help="The unconditional prompt of --prompts (classifier-free guidance).")]
Device = Annotated[str, typer.Option("--device", help="Where to compute: cpu, cuda or cuda:N (CUDA paths: see docs/results.md for the GPUs that verified them).")]
ModelArg = Annotated[str, typer.Argument(help="builtin:NAME, random:ARCH, a diffusers dir, a DiT .pt, a quantized dir, or module:factory.")]

DEFAULT_WORKDIR = Path("diffpro-work")


def parse_int_list(text: str | None, option: str, *, keep_order: bool = False) -> list[int]:
    """A comma list of integers ("4,8"): sorted and unique, or as given with keep_order (e.g. classes to cycle)."""
    if not text or not text.strip():
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: use a comma list of integers like 4,8") from None
    return values if keep_order else sorted(set(values))


def parse_role_list(text: str) -> list[str]:
    """A comma list of layer roles ("patch_embed,final"), or "none" for the empty list (checked by the stage)."""
    if text.strip().lower() == "none":
        return []
    return [r.strip() for r in text.split(",") if r.strip()]


def make_ui(quiet: bool, json_output: bool) -> UI:
    return UI(quiet=quiet or json_output, json_output=json_output)


def make_context(model: str | None, workdir, *, trust_code: bool = False, weights=None, seed: int = 0,
                 quiet: bool = False, json_output: bool = False, force: bool = False, wait: bool = False,
                 conditioning=None, prompts=None, negative_prompt: str = "", device: str = "cpu"):
    """The one StageContext a command hands to its stage: load options, workdir, UI, force, wait."""
    from diffpro_cli.stages.context import StageContext

    return StageContext.create(model or "", workdir, trust_code=trust_code, weights=weights, seed=seed,
                               ui=make_ui(quiet, json_output), force=force, wait=wait, conditioning=conditioning,
                               prompts=prompts, negative_prompt=negative_prompt, device=device)


def attach_conditioning(model, conditioning=None, prompts=None, negative_prompt: str = "", device: str = "cpu"):
    """For commands that load a model themselves (sample): --conditioning read, or --prompts encoded with
    the model's pipeline, attached to `model` (the same checks as the stage commands)."""
    from diffpro_cli.stages.context import LoadOptions

    LoadOptions(conditioning=conditioning, prompts=prompts, negative_prompt=negative_prompt or "")   # usage checks
    if conditioning is not None:
        model.with_conditioning(conditioning)
    elif prompts is not None:
        from diffpro_cli.models.prompts import encode_prompt_file

        model.with_conditioning(encode_prompt_file(model, prompts, negative_prompt or "", device=device))
    return model


class Interrupted(DiffproError):
    exit_code = EXIT_INTERRUPTED


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was (app.main installs the handler for every command), so it
    unwinds like Ctrl-C: temp files removed, the lock untouched, one line, exit 130."""


@contextmanager
def interruptible():
    """Ctrl-C or SIGTERM during a stage command or `run`: one `error:` line naming which, and exit 130
    (typer would turn the KeyboardInterrupt into a bare return value; app.main reports that one for the
    other commands)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        what = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
        raise Interrupted(f"interrupted ({what}); finished artifacts are kept, re-run to resume") from None


@contextmanager
def holding_workdir(ctx):
    """Hold an existing workdir's run lock for the whole command, as `run` does for its stages. Why: a stage
    hashes its inputs before the lock check, so a command that waited (--wait) for another process compared
    the inputs as they were before that process rewrote them, and called itself up to date. A workdir not
    there yet has no inputs to go stale; the stage's own lock creates it. Held, it is also the moment to
    remove the temp files a killed earlier command left (only `run` did, so stage commands kept them).
    torchrun's ranks other than 0 share rank 0's hold: they write nothing (distributed.py)."""
    import os

    if not ctx.workdir.exists() or (os.environ.get("WORLD_SIZE", "1") != "1" and os.environ.get("RANK", "0") != "0"):
        yield
        return
    from diffpro_cli.artifacts import clean_stale_temp_files, workdir_lock

    with workdir_lock(ctx.workdir, wait=ctx.wait, ui=ctx.ui):
        clean_stale_temp_files(ctx.workdir, ctx.ui)
        yield


STAGE_OPTIONS = (("workdir", Workdir, DEFAULT_WORKDIR), ("trust_code", TrustCode, False), ("weights", Weights, None),
                 ("conditioning", Conditioning, None), ("prompts", Prompts, None), ("negative_prompt", NegativePrompt, ""),
                 ("device", Device, "cpu"), ("force", Force, False), ("wait", Wait, False), ("json_output", JsonOut, False), ("quiet", Quiet, False))


def stage_command(fn):
    """Give a stage command the options every stage shares (--workdir, --trust-code, --weights, --conditioning,
    --prompts, --negative-prompt, --device, --force, --wait, --json, --quiet) and call it as fn(ctx, **its own options)
    with the StageContext built from them (its `model` and `seed` options, where it has them, go into the
    context too). One place for the shared options instead of a copy in every command."""
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in list(inspect.signature(fn).parameters.values())[1:]]          # [0] is ctx
    shared = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=ann)
              for name, ann, default in STAGE_OPTIONS]

    @functools.wraps(fn)
    def command(**kwargs):
        opts = {name: kwargs.pop(name) for name, _, _ in STAGE_OPTIONS}
        with interruptible():
            ctx = make_context(kwargs.get("model"), opts.pop("workdir"), seed=kwargs.get("seed", 0), **opts)
            with holding_workdir(ctx):
                return fn(ctx, **kwargs)

    command.__signature__ = inspect.Signature(own + shared)
    command.__annotations__ = {p.name: p.annotation for p in own + shared}
    return command
