"""MLflow bookkeeping through explicit run ids.

Stages log through `MlflowClient` with the run id they are handed instead of mlflow's thread-local
"active run", so logging works the same from any Prefect worker thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_SOURCE_NAME,
                                      MLFLOW_SOURCE_TYPE)

from tasks.config import ConfigError, PipelineConfig, TrackingConfig, load_config, tracking_of
from tasks.core.fingerprint import code_version, inputs_version
from tasks.release.guard import clean_leftovers
from tasks.core.lock import lock_workdir
from tasks.core.stop import clear_stop, interruption, request_stop

_MAX_PARAM_LEN = 6000
PIPELINE_TAG = "modelforge.pipeline"


def fingerprint(cfg: PipelineConfig, data_version: str, root: Path) -> dict[str, str]:
    """What determines a run's outcome: the data, the whole config, the pipeline's code, and the
    user's model code and checkpoint files the config names (edited in place, they are new inputs)."""
    sections = [s for s in cfg.model_dump(by_alias=True) if s != "workdir"]
    spec, files = cfg.user_inputs()
    return {"data_version": data_version, "config_hash": cfg.section_hash(*sections), "code_version": code_version(),
            "inputs_version": inputs_version(spec, files, root) or "none"}


def find_equivalent_run(experiment_id: str, tags: dict[str, str], exclude: str) -> str | None:
    """A FINISHED run with the same fingerprint that shipped a model, if any."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    for run in MlflowClient().search_runs([experiment_id], f"{query} and attributes.status = 'FINISHED'",
                                          order_by=["attributes.start_time DESC"], max_results=20):
        if run.info.run_id != exclude and "registered_version" in run.data.tags and "skipped" not in run.data.tags:
            return run.info.run_id
    return None


def already_done(run: "PipelineRun", data_version: str, force: bool) -> dict | None:
    """Tag the run with its fingerprint; if an equivalent run already shipped (and not `force`),
    mark this one skipped and return its result, else None."""
    tags = fingerprint(run.cfg, data_version, run.root)
    set_tags(run.run_id, tags)
    previous = None if force else find_equivalent_run(run.experiment_id, tags, run.run_id)
    return skip_run(run.run_id, previous, data_version) if previous else None


def skip_run(run_id: str, previous: str, data_version: str) -> dict:
    reason = f"data {data_version[:12]}, config and code unchanged since run {previous[:8]}; pass --force to rerun"
    set_tags(run_id, {"skipped": reason, "equivalent_run": previous})
    name_run(run_id, f"{data_version[:8]} nothing new")
    print(f"[optimize] nothing new: {reason}")
    return {"run_id": run_id, "skipped": reason, "equivalent_run": previous, "data_version": data_version}


def log_dataset(run_id: str, data_dir: Path, data_version: str) -> None:
    """The run's data as an MLflow dataset input: the UI's Dataset column then shows the folder and
    its DVC version (the digest), and runs on the same data version can be told apart from others."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # MLflow registers its local-folder source twice and warns that it is ambiguous
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(data_dir).resolve()))
    dataset = MetaDataset(source, name=Path(data_dir).name, digest=data_version[:36])
    MlflowClient().log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                    [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def name_run(run_id: str, name: str) -> None:
    """Rename a run for what it did, once that is known (the runs table lists names)."""
    MlflowClient().update_run(run_id, name=name)


def source_tags(config_path: str | Path, root: Path) -> dict[str, str]:
    """MLflow's source tags: the config file as the source, and the project's git commit where the
    project is a git repository (so a run links back to the code and config it ran)."""
    tags = {MLFLOW_SOURCE_NAME: str(config_path), MLFLOW_SOURCE_TYPE: "LOCAL"}
    try:
        git = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git here: the tag is optional
        return tags
    top, _, commit = git.stdout.strip().partition("\n")
    # Only the project's own repository: a project folder inside another checkout is not its commit.
    if git.returncode == 0 and Path(top).resolve() == Path(root).resolve():
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def setup_tracking(cfg: TrackingConfig) -> str:
    """Point mlflow at the configured store and return the experiment id (created on first use)."""
    if cfg.uri.startswith("sqlite:///"):
        Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.uri)
    mlflow.set_registry_uri(cfg.uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    if cfg.uri.startswith(("http://", "https://")):  # the server's own artifact store (--artifacts-destination)
        return client.create_experiment(cfg.experiment)
    artifact_dir = cfg.artifact_dir.resolve()
    artifact_dir.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(cfg.experiment, artifact_location=artifact_dir.as_uri())


def start_run(experiment_id: str, name: str, parent_id: str | None = None, tags: dict | None = None) -> str:
    # Strings only: the SQL store coerces a number, an MLflow server's REST store rejects it (TypeError).
    tags = {MLFLOW_RUN_NAME: name, **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_id
    return MlflowClient().create_run(experiment_id, tags=tags, run_name=name).info.run_id


def log_params(run_id: str, params: dict) -> None:
    items = [Param(str(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # the store caps one batch at 100 params
        MlflowClient().log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict, step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(str(k), float(v), now, step) for k, v in metrics.items() if v is not None]
    if items:
        MlflowClient().log_batch(run_id, metrics=items)


def set_tags(run_id: str, tags: dict) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


def log_artifacts(run_id: str, folder: Path, artifact_path: str) -> None:
    MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, text, artifact_file)


def log_json(run_id: str, obj: object, artifact_file: str) -> None:
    log_text(run_id, json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def fail_run(run_id: str, err: BaseException, status: str = "FAILED", reason: str | None = None) -> None:
    """End the run FAILED (or KILLED, for a stop request) with the error, or `reason`, as a tag (visible
    in the runs table) and a full traceback."""
    summary = f"{type(err).__name__}: {reason or err}"
    set_tags(run_id, {"error": summary[:5000], "status_reason": "interrupted" if status == "KILLED" else "failed"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "error.txt"
        path.write_text("".join(traceback.format_exception(err)))
        log_artifact(run_id, path)
    end_run(run_id, status)


def log_stage(run_id: str, stage: str, values: dict) -> None:
    """Numbers become metrics `result.stage.key`, everything else params (config params own `stage.key`)."""
    prefix = f"result.{stage}"
    numbers = {f"{prefix}.{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    others = {f"{prefix}.{k}": v for k, v in values.items() if f"{prefix}.{k}" not in numbers and v is not None}
    log_metrics(run_id, numbers)
    log_params(run_id, others)


@dataclass(frozen=True)
class PipelineRun:
    cfg: PipelineConfig
    root: Path
    experiment_id: str
    run_id: str


def close_orphans(experiment_id: str, workdir: Path, closer: str) -> list[str]:
    """Mark FAILED the runs of this work dir on this host that are still RUNNING: with the work dir
    locked by the caller, no live process can own them (their process was SIGKILLed, or the machine
    went down). Their RUNNING trial runs go with them. Returns the ids closed."""
    client = MlflowClient()
    query = (f"attributes.status = 'RUNNING' and tags.`modelforge.workdir` = '{workdir}' "
             f"and tags.`modelforge.host` = '{socket.gethostname()}'")
    closed = []
    for run in client.search_runs([experiment_id], query, max_results=1000):
        if run.info.run_id == closer:
            continue
        note = (f"orphaned: its process (pid {run.data.tags.get('modelforge.pid', '?')}) ended without closing "
                f"the run (killed?); marked FAILED by run {closer}")
        children = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and "
                                      f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=1000)
        for orphan in [run, *children]:
            set_tags(orphan.info.run_id, {"error": note, "status_reason": "orphaned"})
            end_run(orphan.info.run_id, "FAILED")
        closed.append(run.info.run_id)
    if closed:
        print(f"[track] marked {len(closed)} orphaned run(s) FAILED: {', '.join(c[:8] for c in closed)}")
    return closed


@contextmanager
def pipeline_run(config_path: str | Path, root: str | Path, run_name: str = "optimize",
                 family: str = "classifier", lock_wait_s: float = 0,
                 overrides: list[str] | tuple[str, ...] = ()) -> Iterator[PipelineRun]:
    """Load and print the resolved config, lock the work dir, close runs a killed process left
    RUNNING, open the parent MLflow run, and close it FINISHED; on a stop request (Ctrl-C, SIGTERM)
    KILLED, on any other error (a bad config included) FAILED, with the reason recorded on the run.
    Any error also asks the stages still running in other threads to stop."""
    root = Path(root).resolve()
    clear_stop()
    # The pipeline stays in a tag of its own: the run's name is set to what it did when it ends.
    source = {"config_path": str(config_path), "config_overrides": " ".join(overrides), PIPELINE_TAG: run_name}
    try:
        cfg = load_config(config_path, overrides).resolved(root)
        if cfg.family != family:
            raise ConfigError(f"{config_path} configures the {cfg.family!r} pipeline, not {family!r}: "
                              "run it with `modelforge run --config ...`, which picks the flow by family")
    except ConfigError as err:
        # Filed under the experiment the config names when its tracking section is usable.
        tracking = PipelineConfig(tracking=tracking_of(config_path, overrides)).anchored(root).tracking
        run_id = start_run(setup_tracking(tracking), run_name, tags=source)
        fail_run(run_id, err)
        raise
    with lock_workdir(cfg.workdir, f"{run_name} --config {config_path}", lock_wait_s) as note:
        clean_leftovers(cfg.register_.bundle_dir, cfg.promote.champion_bundle_dir)
        text = yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
        print(f"[config] resolved config from {config_path}"
              f"{' with --set ' + source['config_overrides'] if overrides else ''}:\n{text}")
        experiment_id = setup_tracking(cfg.tracking)
        run_id = start_run(experiment_id, run_name, tags={
            **source, **source_tags(config_path, root), "modelforge.workdir": str(cfg.workdir),
            "modelforge.host": socket.gethostname(), "modelforge.pid": str(os.getpid())})
        note(mlflow_run=run_id)
        try:
            close_orphans(experiment_id, cfg.workdir, run_id)
            log_params(run_id, cfg.flat())
            log_text(run_id, text, "config.yaml")
            yield PipelineRun(cfg, root, experiment_id, run_id)
        except BaseException as err:
            stopped = interruption(err)
            request_stop(stopped or f"{type(err).__name__} in the pipeline run")
            fail_run(run_id, err, "KILLED" if stopped else "FAILED", stopped)
            raise
        end_run(run_id, "FINISHED")


def log_candidates(run_id: str, candidates: list, reports: list, summary: dict[str, Path]) -> None:
    """Per-candidate metrics (`<name>.accuracy` or `<name>.cosine_min`, ..., timings, size), compression
    facts, and the summary files."""
    for report in reports:
        d = report.to_dict()
        keys = [*report.quality, "latency_p50_ms", "latency_p95_ms", "throughput_sps", "size_bytes", "parity_max_abs"]
        log_metrics(run_id, {f"{report.name}.{k}": d[k] for k in keys} | {f"{report.name}.passed": float(report.passed)})
    log_json(run_id, {c.name: {"info": c.info, "onnx": str(c.onnx)} for c in candidates}, "candidates/compression.json")
    log_json(run_id, [r.to_dict() for r in reports], "candidates/reports.json")
    for path in summary.values():
        log_artifact(run_id, path, "candidates")
