"""The search stage as a subflow: `search.workers` trial loops on one shared study, on the task
runner the config names (threads here, or Dask/Ray workers). Wiring only."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.search.fetch import DataRef
from tasks.search.space import SearchConfig
from tasks.search.trials import (
    TrialTracking,
    prepare_study_task,
    run_trials_task,
    watch_workers,
)


@flow(name="search", log_prints=True)
def search_trials(
    cfg: SearchConfig, data: DataRef, out_dir: Path, study: str, tracking: TrialTracking, remote: bool = False
) -> list[int]:
    prepare_study_task(cfg, out_dir, study)  # here, once: workers racing to create a fresh schema collide
    workers = [run_trials_task.submit(cfg, data, out_dir, study, tracking, worker=i) for i in range(cfg.workers)]
    return watch_workers(workers, cfg, out_dir, study, progress=remote)  # a failed worker raises its own exception
