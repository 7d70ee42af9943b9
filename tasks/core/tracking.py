"""MLflow bookkeeping through explicit run ids.

Stages log through `client()` with the run id they are handed instead of mlflow's thread-local
"active run", so logging works the same from any Prefect worker thread.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar, cast

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)
from pydantic import Field

from tasks.core.settings import Section


class TrackingConfig(Section):
    uri: str = Field(
        "sqlite:///.modelforge/mlflow.db",
        description="MLflow tracking URI: sqlite:/// (default), a "
        "server database (postgresql+psycopg://user@host/db) or an MLflow server (http://host:5000).",
    )
    experiment: str = Field("modelforge", min_length=1, description="MLflow experiment name.")
    artifact_dir: Path = Field(
        Path(".modelforge/mlartifacts"),
        description="Artifact root of a new experiment "
        "(an MLflow server, http://..., uses its own artifact store instead).",
    )


_MAX_PARAM_LEN = 6000
PIPELINE_TAG = "modelforge.pipeline"

P = ParamSpec("P")
R = TypeVar("R")
_threads: dict[int, ThreadPoolExecutor] = {}  # by process id: a forked child cannot use its parent's thread


def uninterrupted(call: Callable[P, R]) -> Callable[P, R]:
    """`call` run, when called from the main thread, on the process's one tracking thread.

    Python raises a signal's exception (Ctrl-C, SIGTERM: `tasks.core.stop`) in the main thread between any
    two bytecodes. Raised inside an SQLAlchemy transaction it left SQLite locked: the run's closing write
    waited 20 s for the lock and failed, so a stopped run ended with exit code 1 instead of 143 and stayed
    RUNNING (seen in CI). A call on the tracking thread always completes; an interrupted main thread stops
    waiting for it at once, and its next call (the closing write) queues behind it."""

    @functools.wraps(call)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if threading.current_thread() is not threading.main_thread():
            return call(*args, **kwargs)
        pool = _threads.get(os.getpid())
        if pool is None:
            pool = _threads[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="modelforge-tracking")
        return pool.submit(call, *args, **kwargs).result()

    return run


class _Client:
    def __getattr__(self, name: str) -> Callable:
        # The client is made on the tracking thread too: a store's first use creates its tables.
        return uninterrupted(lambda *args, **kwargs: getattr(MlflowClient(), name)(*args, **kwargs))


def client() -> MlflowClient:
    """An `MlflowClient` whose calls are `uninterrupted`."""
    return cast(MlflowClient, _Client())


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
    dataset = MetaDataset(source, name=Path(data_dir).name, digest=data_version[:36])  # type: ignore[abstract]  # mlflow leaves `profile` unimplemented on its documented MetaDataset (Dataset is no ABC)
    client().log_inputs(
        run_id, [DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
    )


def name_run(run_id: str, name: str) -> None:
    """Rename a run for what it did, once that is known (the runs table lists names)."""
    client().update_run(run_id, name=name)


def source_tags(config_path: str | Path, root: Path) -> dict[str, str]:
    """MLflow's source tags: the config file as the source, and the project's git commit where the
    project is a git repository (so a run links back to the code and config it ran)."""
    tags = {MLFLOW_SOURCE_NAME: str(config_path), MLFLOW_SOURCE_TYPE: "LOCAL"}
    try:
        git = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=10
        )
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
    store = client()
    exp = store.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    if cfg.uri.startswith(("http://", "https://")):  # the server's own artifact store (--artifacts-destination)
        return store.create_experiment(cfg.experiment)
    artifact_dir = cfg.artifact_dir.resolve()
    artifact_dir.mkdir(parents=True, exist_ok=True)
    return store.create_experiment(cfg.experiment, artifact_location=artifact_dir.as_uri())


def start_run(experiment_id: str, name: str, parent_id: str | None = None, tags: dict | None = None) -> str:
    # Strings only: the SQL store coerces a number, an MLflow server's REST store rejects it (TypeError).
    tags = {MLFLOW_RUN_NAME: name, **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_id
    return client().create_run(experiment_id, tags=tags, run_name=name).info.run_id


def log_params(run_id: str, params: dict) -> None:
    items = [Param(str(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # the store caps one batch at 100 params
        client().log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: dict, step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(str(k), float(v), now, step) for k, v in metrics.items() if v is not None]
    if items:
        client().log_batch(run_id, metrics=items)


def set_tags(run_id: str, tags: dict) -> None:
    client().log_batch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_artifacts(run_id: str, folder: Path, artifact_path: str) -> None:
    client().log_artifacts(run_id, str(folder), artifact_path)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_json(run_id: str, obj: object, artifact_file: str) -> None:
    log_text(run_id, json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


@uninterrupted  # a second signal cannot leave the run half closed
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


def log_candidates(run_id: str, candidates: list, reports: list, summary: dict[str, Path]) -> None:
    """Per-candidate metrics (`<name>.accuracy` or `<name>.cosine_min`, ..., timings, size), compression
    facts, and the summary files."""
    for report in reports:
        d = report.to_dict()
        keys = [*report.quality, "latency_p50_ms", "latency_p95_ms", "throughput_sps", "size_bytes", "parity_max_abs"]
        log_metrics(
            run_id, {f"{report.name}.{k}": d[k] for k in keys} | {f"{report.name}.passed": float(report.passed)}
        )
    log_json(run_id, {c.name: {"info": c.info, "onnx": str(c.onnx)} for c in candidates}, "candidates/compression.json")
    log_json(run_id, [r.to_dict() for r in reports], "candidates/reports.json")
    for path in summary.values():
        log_artifact(run_id, path, "candidates")


def log_release(run_id: str, bundle: Path, candidate: str, version: str, quality_metric: str) -> None:
    """The shipped bundle as the run's artifact (what rollback republishes) and the tags that say what shipped."""
    log_artifacts(run_id, bundle, "bundle")
    set_tags(
        run_id,
        {
            "chosen_candidate": candidate,
            "bundle": str(bundle),
            "registered_version": version,
            "quality_metric": quality_metric,
        },
    )
