"""One pipeline run: load the config, lock the work dir, open the MLflow parent run, fingerprint it,
and skip it when an equivalent run already shipped."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.config import EncoderPipelineConfig, LMPipelineConfig, PipelineConfig, load_config, tracking_of
from tasks.core.fingerprint import code_version, inputs_version
from tasks.core.lock import lock_workdir
from tasks.core.settings import ConfigError
from tasks.core.stop import clear_stop, interruption, request_stop
from tasks.core.tracking import (
    PIPELINE_TAG,
    client,
    end_run,
    fail_run,
    log_params,
    log_text,
    name_run,
    set_tags,
    setup_tracking,
    source_tags,
    start_run,
)
from tasks.release.guard import clean_leftovers
from tasks.release.pipeline import PipelineBase


def fingerprint(cfg: PipelineBase, data_version: str, root: Path) -> dict[str, str]:
    """What determines a run's outcome: the data, the whole config, the pipeline's code, and the
    user's model code and checkpoint files the config names (edited in place, they are new inputs)."""
    sections = [s for s in cfg.model_dump(by_alias=True) if s != "workdir"]
    spec, files = cfg.user_inputs()
    return {
        "data_version": data_version,
        "config_hash": cfg.section_hash(*sections),
        "code_version": code_version(),
        "inputs_version": inputs_version(spec, files, root) or "none",
    }


def find_equivalent_run(experiment_id: str, tags: dict[str, str], exclude: str) -> str | None:
    """A FINISHED run with the same fingerprint that shipped a model, if any."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    for run in client().search_runs(
        [experiment_id],
        f"{query} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    ):
        if run.info.run_id != exclude and "registered_version" in run.data.tags and "skipped" not in run.data.tags:
            return run.info.run_id
    return None


def already_done(run: PipelineRun, data_version: str, force: bool) -> dict | None:
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


@dataclass(frozen=True)
class PipelineRun:
    cfg: PipelineConfig | EncoderPipelineConfig | LMPipelineConfig  # the one `family` names
    root: Path
    experiment_id: str
    run_id: str


def close_orphans(experiment_id: str, workdir: Path, closer: str) -> list[str]:
    """Mark FAILED the runs of this work dir on this host that are still RUNNING: with the work dir
    locked by the caller, no live process can own them (their process was SIGKILLed, or the machine
    went down). Their RUNNING trial runs go with them. Returns the ids closed."""
    store = client()
    query = (
        f"attributes.status = 'RUNNING' and tags.`modelforge.workdir` = '{workdir}' "
        f"and tags.`modelforge.host` = '{socket.gethostname()}'"
    )
    closed = []
    for run in store.search_runs([experiment_id], query, max_results=1000):
        if run.info.run_id == closer:
            continue
        note = (
            f"orphaned: its process (pid {run.data.tags.get('modelforge.pid', '?')}) ended without closing "
            f"the run (killed?); marked FAILED by run {closer}"
        )
        children = store.search_runs(
            [experiment_id],
            f"attributes.status = 'RUNNING' and tags.mlflow.parentRunId = '{run.info.run_id}'",
            max_results=1000,
        )
        for orphan in [run, *children]:
            set_tags(orphan.info.run_id, {"error": note, "status_reason": "orphaned"})
            end_run(orphan.info.run_id, "FAILED")
        closed.append(run.info.run_id)
    if closed:
        print(f"[track] marked {len(closed)} orphaned run(s) FAILED: {', '.join(c[:8] for c in closed)}")
    return closed


@contextmanager
def pipeline_run(
    config_path: str | Path,
    root: str | Path,
    run_name: str = "optimize",
    family: str = "classifier",
    lock_wait_s: float = 0,
    overrides: list[str] | tuple[str, ...] = (),
) -> Iterator[PipelineRun]:
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
            raise ConfigError(
                f"{config_path} configures the {cfg.family!r} pipeline, not {family!r}: "
                "run it with `modelforge run --config ...`, which picks the flow by family"
            )
    except ConfigError as err:
        # Filed under the experiment the config names when its tracking section is usable.
        tracking = PipelineConfig(tracking=tracking_of(config_path, overrides)).anchored(root).tracking
        run_id = start_run(setup_tracking(tracking), run_name, tags=source)
        fail_run(run_id, err)
        raise
    with lock_workdir(cfg.workdir, f"{run_name} --config {config_path}", lock_wait_s) as note:
        clean_leftovers(cfg.register_.bundle_dir, cfg.promote.champion_bundle_dir)
        text = yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
        print(
            f"[config] resolved config from {config_path}"
            f"{' with --set ' + source['config_overrides'] if overrides else ''}:\n{text}"
        )
        experiment_id = setup_tracking(cfg.tracking)
        run_id = start_run(
            experiment_id,
            run_name,
            tags={
                **source,
                **source_tags(config_path, root),
                "modelforge.workdir": str(cfg.workdir),
                "modelforge.host": socket.gethostname(),
                "modelforge.pid": str(os.getpid()),
            },
        )
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
