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


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded: the trust flag and weights file reach every loader, quantized dirs included."""

    trust_code: bool = False
    weights: str | None = None
    seed: int = 0
    conditioning: str | None = None      # a file of prompt embeddings (or class labels) every stage calibrates on

    def as_dict(self) -> dict:
        return {"trust_code": self.trust_code, "weights": None if self.weights is None else str(self.weights),
                "conditioning": self.conditioning}


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

    def __post_init__(self):
        self.workdir = Path(self.workdir)

    @property
    def seed(self) -> int:
        return self.load_options.seed

    @classmethod
    def create(cls, model_spec: str, workdir: str | Path, *, trust_code: bool = False, weights=None, seed: int = 0,
               ui: UI = QUIET_UI, force: bool = False, wait: bool = False, device: str = "cpu",
               conditioning=None) -> "StageContext":
        return cls(model_spec, Path(workdir), LoadOptions(bool(trust_code), None if weights is None else str(weights), int(seed),
                                                          None if conditioning is None else str(conditioning)),
                   ui=ui, force=force, wait=wait, device=device)

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
        model = load_model(spec, trust_code=self.load_options.trust_code, weights=weights, seed=seed)
        if self.load_options.conditioning:   # the run's model and its quantized checkpoints sample on the same set
            model.with_conditioning(self.load_options.conditioning)    # shapes checked against the network
        if shared:
            self._models[spec] = model
        return model

    def model(self):
        return self.load()

    def use_model(self, model) -> "StageContext":
        """Share an already-loaded model as the run's model (tests, the Python API)."""
        self._models[self.model_spec] = model
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

        record = model_input_record(model if model is not None else self.model())
        if self.load_options.conditioning:
            cond = sha256_file(Path(self.load_options.conditioning))
            record = {**record, "conditioning": self.load_options.conditioning,
                      "sha256": sha256_json({"model": record["sha256"], "conditioning": cond})}
        return record
