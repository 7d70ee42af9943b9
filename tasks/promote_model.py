"""Champion/challenger: promote a newly registered model only if it beats the model in service.

Both models are scored on the same held-out test split and timed side by side in one process, so
the comparison is like for like. The decision, with both sets of metrics, goes to the MLflow run
and onto the registry version; the previous champion keeps an alias for one-command rollback.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import onnx
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task

from tasks import track_run
from tasks.config import PromoteConfig, ValidateConfig
from tasks.register_model import RegisteredModel
from tasks.evaluate_model import Evaluator
from tasks.run_onnx import make_session, measure_speeds
from tasks.ship_bundle import publish_copy


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None  # the champion before this decision
    challenger: dict  # primary quality (accuracy, worst-case cosine) and latency_p50_ms on the same held-out data
    champion: dict | None


def _alias_version(name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def decide(challenger: dict, champion: dict | None, tolerance_pts: float, quality: str = "accuracy") -> tuple[bool, str]:
    """Promote when clearly better on `quality`, or when it matches within tolerance (in points,
    i.e. hundredths) and is faster."""
    if champion is None:
        return True, "no champion yet"
    gain = (challenger[quality] - champion[quality]) * 100
    speedup = champion["latency_p50_ms"] / challenger["latency_p50_ms"]
    if gain > tolerance_pts:
        return True, f"{quality} better by {gain:.2f} pts"
    if gain >= -tolerance_pts and speedup > 1:
        return True, f"{quality} within {tolerance_pts} pts ({gain:+.2f}) and {speedup:.2f}x faster"
    if gain < -tolerance_pts:
        return False, f"{quality} worse by {-gain:.2f} pts"
    return False, f"{quality} within {tolerance_pts} pts ({gain:+.2f}) but not faster ({speedup:.2f}x)"


def promote_model(registered: RegisteredModel, bundle_dir: Path, cfg: PromoteConfig, timing: ValidateConfig,
                  evaluator: Evaluator, run_id: str) -> Decision:
    champion_version = _alias_version(registered.name, cfg.champion_alias)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"challenger": make_session(Path(bundle_dir) / "model.onnx")}
        if champion_version is not None and champion_version != registered.version:
            path = Path(tmp) / "champion.onnx"
            onnx.save(mlflow.onnx.load_model(f"models:/{registered.name}/{champion_version}"), str(path))
            sessions["champion"] = make_session(path)
        speeds = measure_speeds(sessions, evaluator.timing_inputs(), timing.warmup, timing.latency_runs,
                                timing.throughput_batch, timing.throughput_runs)
        scores = {k: {evaluator.primary: evaluator.quality(s)[evaluator.primary],
                      "latency_p50_ms": speeds[k].latency_p50_ms} for k, s in sessions.items()}
    promoted, reason = decide(scores["challenger"], scores.get("champion"), cfg.quality_tolerance, evaluator.primary)
    decision = Decision(promoted, reason, registered.version, champion_version, scores["challenger"],
                        scores.get("champion"))
    client = MlflowClient()
    if promoted:
        if champion_version is not None:
            client.set_registered_model_alias(registered.name, cfg.previous_alias, champion_version)
        client.set_registered_model_alias(registered.name, cfg.champion_alias, registered.version)
        publish_copy(Path(bundle_dir), cfg.champion_bundle_dir)
    client.set_model_version_tag(registered.name, registered.version, "promotion",
                                 f"{'promoted' if promoted else 'kept champion'}: {reason}")
    _log(run_id, decision)
    verdict = "PROMOTED to" if promoted else "not promoted to"
    print(f"[promote] version {registered.version} {verdict} '{cfg.champion_alias}': {reason} "
          f"(challenger {scores['challenger']}, champion v{champion_version}: {scores.get('champion')})")
    return decision


def _log(run_id: str, decision: Decision) -> None:
    track_run.set_tags(run_id, {"promotion.decision": "promoted" if decision.promoted else "kept",
                                "promotion.reason": decision.reason})
    for role in ("challenger", "champion"):
        if getattr(decision, role):
            track_run.log_metrics(run_id, {f"promotion.{role}.{k}": v for k, v in getattr(decision, role).items()})
    track_run.log_json(run_id, asdict(decision), "promotion.json")


def rollback(model_name: str, cfg: PromoteConfig) -> str:
    """Point the champion alias back at the previous champion and republish its bundle; the current
    champion becomes the 'previous' one, so a second rollback undoes the first."""
    client = MlflowClient()
    previous = _alias_version(model_name, cfg.previous_alias)
    current = _alias_version(model_name, cfg.champion_alias)
    if previous is None:
        raise ValueError(f"{model_name}: no '{cfg.previous_alias}' version to roll back to")
    run_id = client.get_model_version(model_name, previous).run_id
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bundle", dst_path=tmp))
        manifest = json.loads((bundle / "manifest.json").read_text())
        publish_copy(bundle, cfg.champion_bundle_dir)
    client.set_registered_model_alias(model_name, cfg.champion_alias, previous)
    if current is not None:
        client.set_registered_model_alias(model_name, cfg.previous_alias, current)
    client.set_model_version_tag(model_name, previous, "promotion", f"restored by rollback from v{current}")
    print(f"[rollback] {model_name}: '{cfg.champion_alias}' v{current} -> v{previous} "
          f"(bundle sha256 {manifest['sha256'][:12]}... at {cfg.champion_bundle_dir})")
    return previous


promote_model_task = task(promote_model, name="promote_model")
