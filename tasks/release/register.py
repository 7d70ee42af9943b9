"""Log the chosen ONNX model to MLflow with its signature, register it and point an alias at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import onnx
from mlflow.models import infer_signature
from prefect import task
from pydantic import Field

from tasks.core import tracking
from tasks.core.settings import Section
from tasks.onnx.runtime import feeds, make_session
from tasks.release.evaluate import Evaluator


class RegisterConfig(Section):
    model_name: str = Field("digits-classifier", min_length=1, description="MLflow registered-model name.")
    alias: str = Field("candidate", min_length=1, description="Registry alias set on the new version.")
    bundle_dir: Path = Field(Path("deploy/bundle"), description="Serving bundle folder (replaced atomically).")


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    alias: str
    model_uri: str  # models:/name@alias


def register_model(onnx_path: Path, cfg: RegisterConfig, run_id: str, evaluator: Evaluator) -> RegisteredModel:
    session = make_session(onnx_path)
    sample_x = evaluator.example_inputs()
    # The graph's own inputs (int64 input_ids and attention_mask for HF models); one shows as a plain tensor.
    inputs = sample_x if isinstance(sample_x, dict) else feeds(session, sample_x)
    example = inputs if len(inputs) > 1 else next(iter(inputs.values()))
    signature = infer_signature(example, session.run(None, inputs)[0])

    @tracking.uninterrupted
    def log_model() -> str:
        # log_model takes no run id: resume the pipeline run in this thread just for the call.
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)),
                name="model",
                signature=signature,
                input_example=example,
                registered_model_name=cfg.model_name,
                onnx_execution_providers=["CPUExecutionProvider"],
                # The flavor's own pins, stated: left to infer them, MLflow maps every installed package's
                # modules and loads the model again in a subprocess (~4 s of CPU per registration) to arrive at
                # the same two.
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            )
        return str(info.registered_model_version)

    version = log_model()
    tracking.client().set_registered_model_alias(cfg.model_name, cfg.alias, version)
    print(f"[register] {cfg.model_name} version {version} -> alias '{cfg.alias}'")
    return RegisteredModel(cfg.model_name, version, cfg.alias, f"models:/{cfg.model_name}@{cfg.alias}")


register_model_task = task(name="register_model")(register_model)
