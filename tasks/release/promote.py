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
from prefect import task
from pydantic import Field

from tasks.core import tracking
from tasks.core.settings import Section
from tasks.data.base import read_manifest
from tasks.onnx.runtime import make_session, measure_speeds
from tasks.release.evaluate import Evaluator, data_task
from tasks.release.register import RegisteredModel
from tasks.release.ship import io_spec, publish_copy
from tasks.release.stats import ratio_interval
from tasks.release.validate import ValidateConfig


class PromoteConfig(Section):
    champion_alias: str = Field("champion", min_length=1, description="Registry alias of the model in service.")
    previous_alias: str = Field("previous-champion", min_length=1, description="Alias kept for one-command rollback.")
    quality_tolerance: float = Field(
        0.25,
        ge=0,
        description="Points (hundredths of the primary quality: accuracy, worst-case cosine) within which "
        "a challenger 'matches' the champion; it then needs to be faster.",
    )
    significance: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="A challenger is better only if the paired test on the same test samples says so "
        "at this level (McNemar's exact test for classifiers, a paired bootstrap otherwise).",
    )
    min_speedup: float = Field(
        1.05,
        ge=1,
        description="A matching challenger is promoted only if the 95% interval of its speed-up over the "
        "champion (timed side by side) lies above this.",
    )
    champion_bundle_dir: Path = Field(
        Path("deploy/champion"), description="Bundle the server loads; replaced atomically on promotion."
    )


class PromotionError(ValueError):
    """The challenger and the champion do not serve the same task: comparing them means nothing."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None  # the champion before this decision
    challenger: dict  # primary quality (accuracy, worst-case cosine) and latency_p50_ms on the same held-out data
    champion: dict | None
    evidence: dict | None = None  # the paired quality test and the speed-up interval the decision rests on


def _alias_version(name: str, alias: str) -> str | None:
    try:
        return str(tracking.client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _signature(tensors: list[dict] | None) -> list | None:
    """Names, types and ranks: the sizes are the data's (a table's width grows with its categories)
    and the exporter's symbolic names differ between versions; each model is fed its own encoding."""
    return None if tensors is None else [(t["name"], t["dtype"], len(t["shape"])) for t in tensors]


def task_mismatch(champion: dict, challenger: dict) -> list[str]:
    """How two bundle manifests differ in the task they serve: registered model, class names, input
    and output signature, data source, data folder and split rule (the test split's lineage). Facts
    a manifest lacks (an older bundle, or a challenger not exported yet) are not compared."""

    def facts(m: dict) -> dict:
        task = m.get("task") or {}
        return {
            "registered model": (m.get("registered_model") or {}).get("name"),
            "classes": m.get("labels"),
            "inputs": _signature(m.get("inputs")),
            "outputs": _signature(m.get("outputs")),
            "data source": task.get("dataset"),
            "data folder": task.get("data_folder"),
            "split rule": task.get("split"),
        }

    theirs, ours = facts(champion), facts(challenger)
    shown = lambda v: str(v) if len(str(v)) <= 120 else str(v)[:117] + "..."
    return [
        f"{key}: champion {shown(theirs[key])}, challenger {shown(ours[key])}"
        for key in theirs
        if theirs[key] is not None and ours[key] is not None and theirs[key] != ours[key]
    ]


def _champion_manifest(name: str, version: str) -> dict | None:
    """The manifest of the bundle a registered version shipped with (logged to its run)."""
    run_id = tracking.client().get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="bundle/manifest.json", dst_path=tmp
            )
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def folder_conflict(name: str, folder: Path) -> str | None:
    """Why registered model `name` may not replace the bundle in `folder`: it is another model's."""
    manifest = Path(folder) / "manifest.json"
    shipped = json.loads(manifest.read_text()) if manifest.is_file() else {}
    # LM bundles shipped before they named their registered model carry only its `model_name`
    other = (shipped.get("registered_model") or {}).get("name") or shipped.get("model_name")
    if other and other != name:
        return (
            f"{folder} serves the champion of {other!r}, not {name!r}: give this model a champion bundle "
            "folder of its own (promote.champion_bundle_dir)"
        )
    return None


def champion_conflicts(name: str, challenger: dict, cfg: PromoteConfig) -> list[str]:
    """Why registered model `name`'s challenger (a bundle manifest, or the part of one known so far)
    may not be compared with its champion: the champion bundle folder holds another registered
    model's bundle, or the registered champion serves another task. Empty when it may, or when there
    is no champion."""
    problems = [p for p in [folder_conflict(name, cfg.champion_bundle_dir)] if p]
    version = _alias_version(name, cfg.champion_alias)
    if version is not None and (champion := _champion_manifest(name, version)) is not None:
        problems += [
            f"{name} v{version} ('{cfg.champion_alias}') differs in {why}"
            for why in task_mismatch(champion, challenger)
        ]
    return problems


def check_champion(name: str, challenger: dict, cfg: PromoteConfig) -> None:
    if problems := champion_conflicts(name, challenger, cfg):
        raise PromotionError(
            "the challenger cannot be compared with the champion, which serves another task "
            "(nothing was replaced):\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n  A new task needs its own register.model_name and bundle folders."
        )


def check_shipped_against_champion(name: str, bundle_dir: Path, cfg: PromoteConfig) -> None:
    """`check_champion` with the shipped challenger bundle's manifest, before anything is compared or replaced."""
    check_champion(name, json.loads((Path(bundle_dir) / "manifest.json").read_text()), cfg)


def check_champion_before_training(model_name: str, data_dir: Path, cfg: PromoteConfig) -> None:
    """`check_champion` on what the versioned data already says (classes, source, folder, split rule),
    so a run for another task stops before search and training, not after."""
    manifest = read_manifest(data_dir)
    labels = manifest.get("classes", list(range(manifest["num_classes"])) if "num_classes" in manifest else None)
    check_champion(model_name, {"labels": labels, "task": data_task(data_dir)}, cfg)


def check_champion_before_release(model_name: str, onnx_path: Path, evaluator: Evaluator, cfg: PromoteConfig) -> None:
    """`check_champion` with the chosen model's signature, before it is registered or shipped."""
    check_champion(
        model_name, {**io_spec(Path(onnx_path)), **evaluator.serving_info(), "task": data_task(evaluator.data_dir)}, cfg
    )


def decide(quality: dict | None, speed: dict | None, cfg: PromoteConfig, metric: str = "accuracy") -> tuple[bool, str]:
    """Promote when the paired test on the same test samples finds the challenger better, or when it
    is not worse by more than the tolerance (and not significantly worse) and the 95% interval of its
    speed-up lies above `cfg.min_speedup`. `quality`: `Evaluator.paired`'s result; `speed`: the
    speed-up (champion latency / challenger latency) and its interval."""
    if quality is None:
        return True, "no champion yet"
    gain, metric = quality["gain_pts"], quality.get("metric", metric)
    if "p_value" in quality:
        evidence = f"{quality['test']} p = {quality['p_value']:.2g}"
        better = worse = quality["p_value"] < cfg.significance
        better, worse = better and gain > 0, worse and gain < 0
    else:
        low, high = quality["interval_pts"]
        evidence = f"{quality['test']} 95% interval {low:+.2f} to {high:+.2f} pts"
        better, worse = low > 0, high < 0
    if better:
        return True, f"{metric} better by {gain:.2f} pts ({evidence})"
    assert speed is not None  # measured whenever there is a champion to compare with
    speedup, (slow, fast) = speed["speedup"], speed["interval"]
    timing = f"{speedup:.2f}x faster (95% interval {slow:.2f}-{fast:.2f}x)"
    if gain < -cfg.quality_tolerance or worse:
        return False, f"{metric} worse by {-gain:.2f} pts ({evidence})"
    if slow > cfg.min_speedup:
        return True, f"{metric} within {cfg.quality_tolerance} pts ({gain:+.2f}, {evidence}) and {timing}"
    return False, (
        f"{metric} not better by the test ({gain:+.2f} pts, {evidence}) and not measurably faster: "
        f"{timing}, not above {cfg.min_speedup}x"
    )


def promote_model(
    registered: RegisteredModel,
    bundle_dir: Path,
    cfg: PromoteConfig,
    timing: ValidateConfig,
    evaluator: Evaluator,
    run_id: str,
) -> Decision:
    check_shipped_against_champion(registered.name, bundle_dir, cfg)
    champion_version = _alias_version(registered.name, cfg.champion_alias)
    evaluators = {"challenger": evaluator}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {"challenger": make_session(Path(bundle_dir) / "model.onnx")}
        if champion_version is not None and champion_version != registered.version:
            path = Path(tmp) / "champion.onnx"
            onnx.save(mlflow.onnx.load_model(f"models:/{registered.name}/{champion_version}"), str(path))
            sessions["champion"] = make_session(path)
            evaluators["champion"] = evaluator.encoded_as(_champion_manifest(registered.name, champion_version) or {})
        # Each timed on the same samples in its own encoding (a table's width can differ).
        inputs = {k: e.timing_inputs() for k, e in evaluators.items()}
        speeds = measure_speeds(
            sessions,
            inputs["challenger"],
            timing.warmup,
            timing.latency_runs,
            timing.throughput_batch,
            timing.throughput_runs,
            per_session=inputs,
        )
        samples = {k: evaluators[k].per_sample(s) for k, s in sessions.items()}
        scores = {
            k: {
                evaluator.primary: evaluators[k].quality(s)[evaluator.primary],
                "latency_p50_ms": speeds[k].latency_p50_ms,
            }
            for k, s in sessions.items()
        }
    quality = speed = None
    if "champion" in sessions:
        quality = evaluator.paired(samples["challenger"], samples["champion"])
        ratio, low, high = ratio_interval(speeds["champion"].latency_rounds_ms, speeds["challenger"].latency_rounds_ms)
        speed = {"speedup": ratio, "interval": [low, high]}
    return act_on_decision(
        registered, Path(bundle_dir), cfg, champion_version, scores, quality, speed, evaluator.primary, run_id
    )


def act_on_decision(
    registered: RegisteredModel,
    bundle_dir: Path,
    cfg: PromoteConfig,
    champion_version: str | None,
    scores: dict,
    quality: dict | None,
    speed: dict | None,
    metric: str,
    run_id: str,
) -> Decision:
    """Decide (`decide`), then move the aliases and publish the champion bundle when promoted, and
    record the decision and its evidence on the registry version and the run."""
    promoted, reason = decide(quality, speed, cfg, metric)
    decision = Decision(
        promoted,
        reason,
        registered.version,
        champion_version,
        scores["challenger"],
        scores.get("champion"),
        quality and {"quality": quality, "speed": speed},
    )
    client = tracking.client()
    if promoted:
        if champion_version is not None:
            client.set_registered_model_alias(registered.name, cfg.previous_alias, champion_version)
        client.set_registered_model_alias(registered.name, cfg.champion_alias, registered.version)
        publish_copy(bundle_dir, cfg.champion_bundle_dir)
    client.set_model_version_tag(
        registered.name, registered.version, "promotion", f"{'promoted' if promoted else 'kept champion'}: {reason}"
    )
    _log(run_id, decision)
    verdict = "PROMOTED to" if promoted else "not promoted to"
    print(
        f"[promote] version {registered.version} {verdict} '{cfg.champion_alias}': {reason} "
        f"(challenger {scores['challenger']}, champion v{champion_version}: {scores.get('champion')})"
    )
    return decision


def _log(run_id: str, decision: Decision) -> None:
    tracking.set_tags(
        run_id, {"promotion.decision": "promoted" if decision.promoted else "kept", "promotion.reason": decision.reason}
    )
    if decision.evidence:
        quality, speed = decision.evidence["quality"], decision.evidence["speed"]
        tracking.log_metrics(
            run_id,
            {
                "promotion.gain_pts": quality["gain_pts"],
                "promotion.p_value": quality.get("p_value"),
                "promotion.speedup": speed["speedup"],
                "promotion.speedup_low": speed["interval"][0],
                "promotion.speedup_high": speed["interval"][1],
            },
        )
    for role in ("challenger", "champion"):
        if getattr(decision, role):
            tracking.log_metrics(run_id, {f"promotion.{role}.{k}": v for k, v in getattr(decision, role).items()})
    tracking.log_json(run_id, asdict(decision), "promotion.json")


def rollback(model_name: str, cfg: PromoteConfig) -> str:
    """Point the champion alias back at the previous champion and republish its bundle; the current
    champion becomes the 'previous' one, so a second rollback undoes the first."""
    client = tracking.client()
    previous = _alias_version(model_name, cfg.previous_alias)
    current = _alias_version(model_name, cfg.champion_alias)
    if previous is None:
        raise ValueError(f"{model_name}: no '{cfg.previous_alias}' version to roll back to")
    if problem := folder_conflict(model_name, cfg.champion_bundle_dir):
        raise PromotionError(f"rollback of {model_name}: {problem}")
    run_id = client.get_model_version(model_name, previous).run_id
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bundle", dst_path=tmp))
        manifest = json.loads((bundle / "manifest.json").read_text())
        publish_copy(bundle, cfg.champion_bundle_dir)
    client.set_registered_model_alias(model_name, cfg.champion_alias, previous)
    if current is not None:
        client.set_registered_model_alias(model_name, cfg.previous_alias, current)
    client.set_model_version_tag(model_name, previous, "promotion", f"restored by rollback from v{current}")
    print(
        f"[rollback] {model_name}: '{cfg.champion_alias}' v{current} -> v{previous} "
        f"(bundle sha256 {manifest['sha256'][:12]}... at {cfg.champion_bundle_dir})"
    )
    return previous


promote_model_task = task(name="promote_model")(promote_model)
check_champion_task = task(name="check_champion")(check_champion_before_training)
check_release_task = task(name="check_champion_signature")(check_champion_before_release)
