"""The Prefect task runner the search trials run on, checked before anything runs.

`local` keeps the trials as threads of the run's process. `dask` and `ray` send each search worker
to a cluster; the checks here catch, before the data stage, what would otherwise fail on every
worker one trial at a time: a missing extra, a database driver that is not installed, a Prefect
API the workers cannot reach.
"""

from __future__ import annotations

import logging
import os
from typing import Literal
from urllib.parse import urlparse

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from tasks.core.settings import ConfigError, Section
from tasks.search.space import SearchConfig

SERVER_DATABASES = ("postgresql", "mysql", "mssql", "oracle")  # SQLAlchemy dialects several machines can share


def is_server_database(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in SERVER_DATABASES


class RunnerConfig(Section):
    """Where the search trials run. Every worker gets all it needs from the config: the data by its
    DVC md5 from the remote, the tracking store and the study storage by URL."""

    kind: Literal["local", "dask", "ray"] = Field(
        "local",
        description="local: threads of the run's own process; dask: a Dask cluster, or with no address a "
        "LocalCluster of `search.workers` processes on this machine; ray: a Ray cluster.",
    )
    address: str | None = Field(
        None,
        description="Scheduler of a running cluster (dask: tcp://host:8786; "
        "ray: ray://host:10001). None: dask starts a LocalCluster, ray a local instance.",
    )
    data_cache: str = Field(
        "~/.cache/modelforge/data",
        description="Folder, on each worker's machine, where the "
        "worker keeps the data versions it fetched from the DVC remote.",
    )

    @property
    def multi_machine(self) -> bool:
        """Workers may sit on other machines: nothing local to the driver (files, SQLite) is shared."""
        return self.kind == "ray" or (self.kind == "dask" and self.address is not None)


def _driver_problem(key: str, url: str) -> str | None:
    """Why SQLAlchemy cannot open `url` here (a missing DBAPI such as psycopg2), or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as err:
        return f"{key}: {url!r} is not a database URL SQLAlchemy knows ({err})"
    except ImportError as err:
        hint = (
            " (the cluster extra installs psycopg 3: write postgresql+psycopg://...)"
            if url.startswith("postgresql")
            else ""
        )
        return f"{key}: the database driver for {url.split('://')[0]} is not installed ({err}){hint}"
    return None


def _prefect_api_problem(runner: RunnerConfig) -> str | None:
    """Cluster workers report task states to the run's Prefect API: without one each worker would
    start a temporary server of its own, and one on 127.0.0.1 is out of reach of other machines."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return (
            f"runner.kind {runner.kind}: no Prefect API to report to (PREFECT_API_URL is unset); "
            "`modelforge run` starts one, or start `prefect server start` and set PREFECT_API_URL"
        )
    local = ("127.0.0.1", "localhost", "::1")
    scheduler = urlparse(runner.address).hostname if runner.address else None
    if scheduler and scheduler not in local and urlparse(url).hostname in local:
        return (
            f"runner at {runner.address}: the Prefect API {url} is local to this machine; start "
            "`prefect server start --host 0.0.0.0` and set PREFECT_API_URL=http://<this host>:4200/api"
        )
    return None


def search_runner(search: SearchConfig, runner: RunnerConfig, tracking_uri: str) -> TaskRunner:
    """The task runner for `search.workers` search workers, after checking that it can work."""
    workers = search.workers
    problems = [
        p
        for key, url in (("search.storage", search.storage), ("tracking.uri", tracking_uri))
        if url and is_server_database(url) and (p := _driver_problem(key, url))
    ]
    if runner.kind != "local" and (p := _prefect_api_problem(runner)):
        problems.append(p)
    try:
        if runner.kind == "dask":
            from prefect_dask import DaskTaskRunner
        elif runner.kind == "ray":
            from prefect_ray import RayTaskRunner
    except ImportError as err:
        extra = "cluster" if runner.kind == "dask" else "ray"
        problems.append(f"runner.kind {runner.kind} needs the {extra} extra: pip install -e '.[{extra}]' ({err})")
    if problems:
        raise ConfigError("the configured runner cannot work:\n" + "\n".join(f"  - {p}" for p in problems))
    if runner.kind == "local":
        return ThreadPoolTaskRunner(max_workers=workers)
    if runner.kind == "dask":
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the run's own output, not every heartbeat
        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(workers))
    return RayTaskRunner(address=runner.address)


def local_cluster_kwargs(workers: int) -> dict:
    """A Dask LocalCluster of `workers` processes with one task thread each (a trial is CPU-bound torch
    code; threads of one process would serialise on the GIL between torch calls), the cores shared
    out between them instead of every worker's torch starting a thread per core."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "silence_logs": logging.WARNING,
        "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    }
