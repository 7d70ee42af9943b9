"""The pipelines' configs, assembled from the stages' sections (each defined beside the code it
configures), and loading one from a file.

`load_config` validates the whole file at once and raises a single `ConfigError` listing every
problem, so a user fixes a config in one pass instead of one error per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from tasks.compress.recipe import CompressConfig
from tasks.core.config_file import all_errors, apply_overrides, format_errors, read_config_file
from tasks.core.settings import ConfigError, excerpt, problem_list
from tasks.core.tracking import TrackingConfig
from tasks.data import ClassifierData
from tasks.data.corpus import CorpusConfig
from tasks.data.digits import DataConfig
from tasks.data.docstrings import TextDataConfig
from tasks.encoder.compress import DistillLayers, EncoderCompressConfig
from tasks.encoder.minilm import EncoderConfig
from tasks.lm.finetune import FinetuneConfig
from tasks.lm.model import LMModelConfig
from tasks.lm.release import (
    LMGateConfig,
    LMPromoteConfig,
    LMRegisterConfig,
    LMValidateConfig,
)
from tasks.lm.search import LMCompressConfig
from tasks.models import ModelConfig
from tasks.release.pipeline import PipelineBase
from tasks.release.promote import PromoteConfig
from tasks.release.register import RegisterConfig
from tasks.search.runner import RunnerConfig, is_server_database
from tasks.search.space import SearchConfig
from tasks.train.stage import TrainConfig


class PipelineConfig(PipelineBase):
    """Classifier pipeline: data set -> search -> train -> compress -> validate -> ship."""

    family: Literal["classifier"] = Field("classifier", description="Which pipeline this file configures.")
    data: ClassifierData = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    def anchored(self, root: Path):
        """`PipelineBase.anchored`, and a relative pretrained checkpoint folder (model.pretrained and the
        text data's tokenizer; the packaged one is a name) taken as the project's."""
        from tasks.models.hf import PACKAGED

        root = Path(root).resolve()
        folder = lambda name: str(root / name) if name and name != PACKAGED and not Path(name).is_absolute() else name
        cfg = super().anchored(root)
        model = cfg.model.model_copy(update={"pretrained": folder(cfg.model.pretrained)})
        data = (
            cfg.data.model_copy(update={"tokenizer": folder(cfg.data.tokenizer)})
            if hasattr(cfg.data, "tokenizer")
            else cfg.data
        )
        return cfg.model_copy(update={"model": model, "data": data})

    def user_inputs(self) -> tuple[str | None, list[Path]]:
        from tasks.models.hf import pretrained_folder

        files = [
            self.model.weights,
            self.train.init_from,
            pretrained_folder(self.model.pretrained),
            pretrained_folder(getattr(self.data, "tokenizer", None)),
        ]
        return self.model.spec, [Path(f) for f in files if f]

    @model_validator(mode="after")
    def _model_fits(self) -> PipelineConfig:
        problems = []
        if "custom" in self.search.space.families and self.model.spec is None:
            problems.append("search.space.families names custom but model.spec is not set")
        if "hf" in self.search.space.families and self.model.pretrained is None:
            problems.append("search.space.families names hf but model.pretrained is not set")
        problems += self._students_missing()
        if self.model.pretrained is not None:
            if self.data.dataset == "table":
                problems.append(
                    f"model.pretrained is {self.model.pretrained}: a pretrained Hugging Face model takes "
                    f"texts or images, and the data is {self.data.dataset}"
                )
            elif self.data.dataset == "text" and self.data.tokenizer != self.model.pretrained:
                problems.append(
                    f"model.pretrained is {self.model.pretrained}: its texts must be tokenized by it, so "
                    f"data.tokenizer must be {self.model.pretrained} too"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _students_missing(self) -> list[str]:
        """Distillation with no named student needs a teacher that makes its own (a narrower or shallower
        twin); found out after search and training, it used to fail the run at compression."""
        from tasks.models import FAMILIES

        teachers = [self.model.family] if self.model.family else self.search.space.families
        lacking = [f for f in teachers if f in FAMILIES and not (FAMILIES[f].scales or FAMILIES[f].shallower)]
        return [
            f"candidate {name!r}: distill has no student for a {lacking[0]} teacher (it has no scaled-down twin); "
            "name one, e.g. student: {family: mlp, width: 64, depth: 1}, or drop the candidate"
            for name, recipe in self.compress.candidates.items()
            if lacking and any(step.method == "distill" and step.student is None for step in recipe)
        ]

    @model_validator(mode="after")
    def _val_held_out(self) -> PipelineConfig:
        """Accuracy-aware INT8 measures its loss on val. A refit model has trained on val: the refit
        MiniLM classifier scored 1.0000 there with every INT8 variant (measured), so the loss reads
        zero and the tuning would stop at once, blind."""
        if not self.train.refit:
            return self
        tuned = [
            name
            for name, recipe in self.compress.candidates.items()
            if any(getattr(step, "max_accuracy_loss", None) is not None for step in recipe)
        ]
        if tuned:
            raise ValueError(
                f"candidates {', '.join(tuned)}: accuracy-aware quantization (max_accuracy_loss) measures "
                "its loss on val, which train.refit trains on; drop one of the two"
            )
        return self

    @model_validator(mode="after")
    def _runner_fits(self) -> PipelineConfig:
        """Workers on other machines cannot share the driver's files: SQLite, a journal file, a
        relative folder. Refused here, before anything runs, not found out as trials landing in a
        stray store on each worker."""
        if not self.runner.multi_machine:
            return self
        where = f"runner.kind {self.runner.kind}" + (f" at {self.runner.address}" if self.runner.address else "")
        problems = []
        if not (self.search.storage and is_server_database(self.search.storage)):
            problems.append(
                f"search.storage is {self.search.storage or 'a file under the work dir (default)'}; with "
                f"{where} the study must live in a server database every worker reaches, "
                "e.g. postgresql+psycopg://user:password@host:5432/optuna"
            )
        uri = self.tracking.uri
        if not (is_server_database(uri) or uri.startswith(("http://", "https://"))):
            problems.append(
                f"tracking.uri is {uri}; with {where} trial runs must go to a store every worker "
                "reaches: an MLflow server (http://host:5000) or a server database "
                "(postgresql+psycopg://user:password@host:5432/mlflow)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class EncoderRegisterConfig(RegisterConfig):
    """The encoder's own registry name and bundle, so both pipelines can ship from one project."""

    model_name: str = Field("minilm-encoder", min_length=1, description="MLflow registered-model name.")
    bundle_dir: Path = Field(Path("deploy/minilm-bundle"), description="Serving bundle folder (replaced atomically).")


class EncoderPromoteConfig(PromoteConfig):
    champion_bundle_dir: Path = Field(
        Path("deploy/minilm-champion"), description="Champion bundle; replaced atomically on promotion."
    )


class EncoderPipelineConfig(PipelineBase):
    """Sentence-encoder pipeline: pretrained MiniLM -> ONNX -> optimise/quantise/distil -> validate -> ship."""

    family: Literal["minilm"] = Field("minilm", description="Which pipeline this file configures.")
    data: TextDataConfig = Field(default_factory=TextDataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    compress: EncoderCompressConfig = Field(default_factory=EncoderCompressConfig)
    register_: EncoderRegisterConfig = Field(default_factory=EncoderRegisterConfig, alias="register")
    promote: EncoderPromoteConfig = Field(default_factory=EncoderPromoteConfig)

    @model_validator(mode="after")
    def _students_fit_teacher(self) -> EncoderPipelineConfig:
        layers = self.encoder.num_layers or 6
        problems = [
            f"compress.candidates.{name}: keep={step.keep} but the teacher has layers 0..{layers - 1}"
            for name, steps in self.compress.candidates.items()
            for step in steps
            if isinstance(step, DistillLayers) and (max(step.keep) >= layers or min(step.keep) < 0)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LMPipelineConfig(PipelineBase):
    """Causal-LM pipeline: model + corpus -> FP32 ONNX for generation -> weight-only candidates (searched) ->
    validate + gates -> register -> ship -> promote."""

    family: Literal["causal_lm"] = Field("causal_lm", description="Which pipeline this file configures.")
    data: CorpusConfig = Field(default_factory=CorpusConfig)
    lm: LMModelConfig
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compress: LMCompressConfig = Field(default_factory=LMCompressConfig)
    # judged by its own measures (perplexity, agreement with FP32, decode speed), not the classifiers' ones
    validate_: LMValidateConfig = Field(  # type: ignore[assignment]  # its own section, by design
        default_factory=LMValidateConfig, alias="validate"
    )
    gates: LMGateConfig = Field(default_factory=LMGateConfig)  # type: ignore[assignment]  # its own section
    register_: LMRegisterConfig = Field(default_factory=LMRegisterConfig, alias="register")
    promote: LMPromoteConfig = Field(default_factory=LMPromoteConfig)

    def anchored(self, root: Path):
        cfg = super().anchored(root)
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"model": cfg.lm.model})})

    def user_inputs(self) -> tuple[str | None, list[Path]]:
        return None, [self.lm.model]  # not DVC-tracked: replaced in place, it must not look like the same run

    @model_validator(mode="after")
    def _fits_context(self) -> LMPipelineConfig:
        if self.data.window > self.lm.max_length:
            raise ValueError(f"data.window ({self.data.window}) exceeds lm.max_length ({self.lm.max_length})")
        separate = [n for n, r in self.compress.candidates.items() if r.adapter == "separate"]
        if separate and not self.finetune.enabled:
            raise ValueError(f"compress.candidates {separate}: adapter 'separate' needs finetune.enabled (no adapter)")
        return self


PIPELINES: dict[str, type[PipelineConfig] | type[EncoderPipelineConfig] | type[LMPipelineConfig]] = {
    "classifier": PipelineConfig,
    "minilm": EncoderPipelineConfig,
    "causal_lm": LMPipelineConfig,
}


def parse_config(
    raw: dict, source: str = "<dict>", unknown: list[str] | tuple[str, ...] = ()
) -> PipelineConfig | EncoderPipelineConfig | LMPipelineConfig:
    """Validate `raw` against the pipeline its `family` key names (default: classifier); `unknown`:
    problems found while reading it (keys dropped before validation), reported with the others."""
    family = raw.get("family", "classifier")
    if family not in PIPELINES:
        raise ConfigError(
            f"invalid config {source}: family {excerpt(repr(family), 80)} is not one of {sorted(PIPELINES)}"
        )
    try:
        cfg, errors = PIPELINES[family].model_validate(raw), []
    except ValidationError:
        cfg, errors = None, all_errors(PIPELINES[family], raw)
    if problems := [*unknown, *format_errors(errors)]:
        raise ConfigError(problem_list(f"invalid config {source}", problems))
    assert cfg is not None  # no problems: it validated
    return cfg


def tracking_of(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrackingConfig:
    """The tracking section of a config that may be invalid elsewhere (so a failed run is filed
    under the experiment the user named); the defaults when that section itself is unusable."""
    try:
        raw = apply_overrides(read_config_file(path, PIPELINES)[0], overrides)
        return TrackingConfig.model_validate(raw.get("tracking") or {})
    except (ValidationError, AttributeError, ConfigError):
        return TrackingConfig()


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig | EncoderPipelineConfig | LMPipelineConfig:
    """The config file at `path`, with `overrides` (`dotted.key=value`) applied, validated as one."""
    raw, unknown = read_config_file(path, PIPELINES)
    source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
    return parse_config(apply_overrides(raw, overrides), excerpt(source), unknown)
