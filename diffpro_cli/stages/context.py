"""One context for every stage: what to load and how, where to write, the seed, the UI.

Every stage is `run_<stage>(ctx, cfg, **inputs) -> StageResult`. The context loads the float model once
(`ctx.model()`) and loads anything else the run needs (a quantized checkpoint of the same model, the
model a cost table is timed on) through `ctx.load(spec)`, with the same `trust_code` / `weights` /
seed. That is what keeps `--trust-code`, given once, reaching every stage (issue #18: bench and
allocate used to reload quantized checkpoints of `module:factory` models without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffpro_cli.console import QUIET_UI, UI
from diffpro_cli.devices import device_text
from diffpro_cli.errors import UsageError


SEED_MAX = 2 ** 63 - 1   # numpy's generators refuse negative seeds, torch's manual_seed anything from 2**64


def check_seed(seed, where: str = "--seed") -> int:
    """One rule for every seed a run takes (CLI, API, a config's sections): an integer in [0, 2**63).
    A negative seed crashed numpy's bootstraps after the work was done; a huge one, torch's manual_seed."""
    import numbers

    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise UsageError(f"{where} {seed!r}: use an integer from 0 to {SEED_MAX}")
    if not 0 <= int(seed) <= SEED_MAX:
        raise UsageError(f"{where} {seed}: use an integer from 0 to {SEED_MAX} (2**63 - 1)")
    return int(seed)


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded: the trust flag and weights file reach every loader, quantized dirs included."""

    trust_code: bool = False
    weights: str | None = None
    seed: int = 0
    conditioning: str | None = None      # a file of prompt embeddings (or class labels) every stage calibrates on
    prompts: str | None = None           # or a prompts file, encoded once with the pipeline's own text encoders
    negative_prompt: str = ""            # the unconditional prompt of --prompts (classifier-free guidance)

    def __post_init__(self):
        if self.conditioning and self.prompts:
            raise UsageError("--prompts and --conditioning both give the conditioning; pass one of them")
        if self.negative_prompt and not self.prompts:
            raise UsageError("--negative-prompt belongs to --prompts; add --prompts FILE (or drop --negative-prompt)")

    def as_dict(self) -> dict:
        return {"trust_code": self.trust_code, "weights": None if self.weights is None else str(self.weights),
                "conditioning": self.conditioning, "prompts": self.prompts, "negative_prompt": self.negative_prompt}


@dataclass
class StageResult:
    """A stage's lock outcome plus the record its artifact holds (plan, timesteps payload, report...)."""

    outcome: Any                 # stages.common.StageOutcome
    value: Any = None

    def as_dict(self) -> dict:
        return self.outcome.as_dict()

    @property
    def status(self) -> str:
        return self.outcome.status

    def __iter__(self):      # `outcome, value = run_<stage>(...)`
        return iter((self.outcome, self.value))


@dataclass
class StageContext:
    model_spec: str
    workdir: Path
    load_options: LoadOptions = field(default_factory=LoadOptions)
    ui: UI = field(default_factory=lambda: QUIET_UI)
    force: bool = False
    wait: bool = False
    device: str = "cpu"
    _models: dict = field(default_factory=dict, repr=False)
    _prompt_conditioning: Any = field(default=None, repr=False)   # --prompts encoded (once per context)

    def __post_init__(self):
        from diffpro_cli.allocator import steady_allocator

        self.workdir = Path(self.workdir)
        # before anything reads a cost table: its fingerprint records the allocator, and a stage that
        # checks one before loading a model (allocate) must see the setting it will time under
        steady_allocator()

    @property
    def seed(self) -> int:
        return self.load_options.seed

    @classmethod
    def create(cls, model_spec: str, workdir: str | Path, *, trust_code: bool = False, weights=None, seed: int = 0,
               ui: UI = QUIET_UI, force: bool = False, wait: bool = False, device: str = "cpu",
               conditioning=None, prompts=None, negative_prompt: str | None = "") -> "StageContext":
        return cls(model_spec, Path(workdir), LoadOptions(bool(trust_code), None if weights is None else str(weights), check_seed(seed),
                                                          None if conditioning is None else str(conditioning),
                                                          None if prompts is None else str(prompts), negative_prompt or ""),
                   ui=ui, force=force, wait=wait, device=device_text(device))

    def load(self, spec: str | Path | None = None, *, seed: int | None = None):
        """Load `spec` (default: the run's model) with the run's trust flag, weights and seed. The run's own
        model is loaded once and shared; quantized checkpoints are loaded fresh each call (callers keep them).
        `seed` overrides the run's (random and untrained weights are drawn from it: a stage that must see
        the network another stage profiled passes that stage's recorded seed)."""
        from diffpro_cli.loading import load_model

        spec = self.model_spec if spec is None else str(spec)
        seed = self.load_options.seed if seed is None else int(seed)
        shared = spec == self.model_spec and seed == self.load_options.seed
        if shared and spec in self._models:
            return self._models[spec]
        # --weights belongs to the run's module:factory model; a quantized dir carries its own tensors
        weights = self.load_options.weights if spec == self.model_spec else None
        model = load_model(spec, trust_code=self.load_options.trust_code, weights=weights, seed=seed, device=self.device)
        if self.load_options.conditioning:   # the run's model and its quantized checkpoints sample on the same set
            model.with_conditioning(self.load_options.conditioning)    # shapes checked against the network
        elif self.load_options.prompts:
            model.with_conditioning(self.prompt_conditioning(model if spec == self.model_spec else None))
        if shared:
            self._models[spec] = model
        return model

    def model(self):
        return self.load()

    def prompt_conditioning(self, model=None):
        """--prompts encoded once per run with the text encoders of the run's model's pipeline (`model`: the
        run's model when the caller has it loaded); every model the run loads samples on this record."""
        if self._prompt_conditioning is None:
            from diffpro_cli.models.prompts import encode_prompt_file

            model = self.model() if model is None else model
            if self._prompt_conditioning is None:      # self.model() may just have encoded them
                self.ui.info(f"encoding {self.load_options.prompts} with the pipeline's text encoders")
                self._prompt_conditioning = encode_prompt_file(model, self.load_options.prompts, self.load_options.negative_prompt,
                                                               device=self.device)
        return self._prompt_conditioning

    def conditioning_file(self) -> str | None:
        """The run's conditioning as a file, for child processes (bench's fresh-process memory rows): the
        --conditioning file as given, or the --prompts embeddings written once (atomically) to
        WORKDIR/prompts/embeddings.safetensors; None without either."""
        opts = self.load_options
        if opts.conditioning or not opts.prompts:
            return opts.conditioning
        from diffpro_cli.artifacts import atomic_save_safetensors
        from diffpro_cli.models.conditioning import conditioning_sha256, conditioning_to_tensors

        cond = self.prompt_conditioning()
        path = self.workdir / "prompts" / "embeddings.safetensors"
        atomic_save_safetensors(path, conditioning_to_tensors(cond),
                                metadata={"prompts": str(opts.prompts), "negative_prompt": opts.negative_prompt,
                                          "embeddings_sha256": conditioning_sha256(cond)})
        return str(path)

    def use_model(self, model) -> "StageContext":
        """Share an already-loaded model as the run's model (tests, the Python API); the run's --conditioning
        or --prompts, when given, is attached to it as to every model the run loads."""
        self._models[self.model_spec] = model
        if self.load_options.conditioning:
            model.with_conditioning(self.load_options.conditioning)
        elif self.load_options.prompts:
            model.with_conditioning(self.prompt_conditioning(model))
        return self

    def run_stage(self, stage: str, inputs: dict[str, dict], config: dict, outputs: dict[str, Path],
                  compute: Callable[[], Any], *, seed: int | None = None, force: bool | None = None,
                  reread: Callable[[], Any] | None = None) -> StageResult:
        """The lock skeleton (stages.common.run_stage) with this context's workdir, force, wait and UI.
        The result's value is what `compute` returned, or `reread()` (the artifact on disk) when the
        stage was up to date."""
        from diffpro_cli.stages.common import run_stage

        box = {}

        def computed():
            box["value"] = compute()

        if self.device != "cpu":   # GPU numerics differ from the CPU's: a stage run there is another result
            config = {**config, "device": self.device}
        outcome = run_stage(self.workdir, stage, inputs, config, outputs, computed,
                            force=self.force if force is None else force, seed=self.seed if seed is None else seed,
                            ui=self.ui, wait=self.wait)
        if "value" not in box and reread is not None:
            box["value"] = reread()
        return StageResult(outcome, box.get("value"))

    def model_record(self, model=None) -> dict:
        """The model's lock record; with a conditioning file its hash joins the model's (calibration
        on other prompts is another input)."""
        from diffpro_cli.artifacts import model_input_record, sha256_file, sha256_json

        model = model if model is not None else self.model()
        record = model_input_record(model)
        opts = self.load_options
        if opts.conditioning:
            cond = sha256_file(Path(opts.conditioning))
            record = {**record, "conditioning": opts.conditioning,
                      "sha256": sha256_json({"model": record["sha256"], "conditioning": cond})}
        elif opts.prompts:   # the prompts and what the text encoders made of them are both inputs
            from diffpro_cli.models.conditioning import conditioning_sha256

            prompts = {"prompts": opts.prompts, "prompts_sha256": sha256_file(Path(opts.prompts)),
                       "negative_prompt": opts.negative_prompt,
                       "embeddings_sha256": conditioning_sha256(self.prompt_conditioning(model))}
            content = {k: v for k, v in prompts.items() if k != "prompts"}    # the file's bytes, not its path
            record = {**record, **prompts, "sha256": sha256_json({"model": record["sha256"], **content})}
        return record
