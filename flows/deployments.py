"""Prefect deployments of one model's pipeline (`optimize`, or `optimize-encoder` for `family: minilm`)
on a local process work pool, one pair per model (its `register.model_name`), so several models and
projects share one Prefect server:

- `<model>-nightly`: a cron schedule (02:00 UTC by default);
- `<model>-on-new-data`: started by the `modelforge.data.changed` event that `modelforge data-changed`
  emits for this model's data folder, and by no other data's events.

Every path a run needs is stored absolute, with the `--set` overrides, so a worker started in any
folder runs exactly what `deploy` was given. Both need a real Prefect server and a worker
(`modelforge stack start`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.client.schemas.schedules import CronSchedule
from prefect.events import DeploymentEventTrigger, EventTrigger, ResourceSpecification

from tasks.core.prefect import POOL, ensure_pool
from tasks.data.notify import EVENT, data_resource

NIGHTLY = "nightly"
ON_NEW_DATA = "on-new-data"
TAG = "modelforge"  # every deployment made here; `model:<name>` names its model
CODE_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {"classifier": "flows/optimize.py:optimize", "minilm": "flows/encode.py:optimize_encoder"}


@dataclass(frozen=True)
class Deployed:
    name: str  # flow/deployment, as `prefect deployment run` takes it
    id: str
    model: str
    runs_on: str  # its cron schedule, or the event and resource its trigger matches
    parameters: dict


def deployment_name(model: str, kind: str) -> str:
    return f"{model}-{kind}"


def list_deployments() -> list[Deployed]:
    """Every deployment `deploy_model` made on the current Prefect server."""
    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])))
        flows = {d.flow_id: client.read_flow(d.flow_id).name for d in found}
        out = []
        for d in found:
            events = [
                a.trigger
                for a in client.read_resource_related_automations(f"prefect.deployment.{d.id}")
                if isinstance(a.trigger, EventTrigger) and a.trigger.expect
            ]  # not automations made elsewhere
            # the trigger's validator turns a dict `match` into a ResourceSpecification
            triggers = [
                f"event {' '.join(sorted(t.expect))} of "
                f"{cast(ResourceSpecification, t.match).root.get('prefect.resource.id')}"
                for t in events
            ]
            crons = [f"cron {s.schedule.cron}" for s in d.schedules or [] if isinstance(s.schedule, CronSchedule)]
            model = next(t.removeprefix("model:") for t in d.tags if t.startswith("model:"))
            out.append(
                Deployed(
                    f"{flows[d.flow_id]}/{d.name}",
                    str(d.id),
                    model,
                    ", ".join(crons + triggers) or "-",
                    dict(d.parameters),
                )
            )
    return sorted(out, key=lambda d: d.name)


def remove_model(model: str) -> list[Deployed]:
    """Delete the model's deployments and their triggers; returns what was removed (nothing when none)."""
    doomed = [d for d in list_deployments() if d.model == model]
    with get_client(sync_client=True) as client:
        for d in doomed:
            # The server keeps a deleted deployment's trigger automations: remove them first.
            client.delete_resource_owned_automations(f"prefect.deployment.{d.id}")
            client.delete_deployment(UUID(d.id))
    return doomed


def deploy_model(
    config_path: str | Path,
    root: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    pool: str = POOL,
    cron: str = "0 2 * * *",
) -> list[Deployed]:
    """Create or update the nightly and on-new-data deployments of the model `config_path` (with
    `overrides`) configures for the project at `root`. The config is loaded now, so one that would
    fail every night fails here; a model name already deployed from another config or project is
    refused rather than silently taken over. The worker loads the flow code from this checkout."""
    from prefect import Flow, deploy
    from prefect.deployments.runner import RunnerDeployment

    from tasks.config import load_config

    config, root, overrides = Path(config_path).resolve(), Path(root).resolve(), list(overrides)
    cfg = load_config(config, overrides).resolved(root)
    model = cfg.register_.model_name
    params = {
        "config_path": str(config),
        "root": str(root),
        "overrides": overrides,
        # a scheduled or triggered run queues behind one already running on the work dir (an hour at most)
        "lock_wait_s": 3600,
    }
    for other in list_deployments():
        if other.model == model and (other.parameters.get("config_path"), other.parameters.get("root")) != (
            str(config),
            str(root),
        ):
            raise ValueError(
                f"model {model} is already deployed from {other.parameters.get('config_path')} in "
                f"{other.parameters.get('root')} ({other.name}): give this one another name "
                f"(--set register.model_name=...) or remove that one (modelforge deploy --remove {model})"
            )
    ensure_pool(pool)
    source = Flow.from_source(source=str(CODE_ROOT), entrypoint=ENTRYPOINTS[cfg.family])
    assert isinstance(source, Flow)  # called from sync code, Prefect's async_dispatch returns the result itself
    common: dict[str, Any] = dict(work_pool_name=pool, parameters=params, tags=[TAG, f"model:{model}"])
    nightly = source.to_deployment(
        deployment_name(model, NIGHTLY),
        cron=cron,
        **common,
        description=f"Nightly optimisation of {model}; skips itself when nothing changed.",
    )
    on_new_data = source.to_deployment(
        deployment_name(model, ON_NEW_DATA),
        **common,
        triggers=[DeploymentEventTrigger(expect={EVENT}, match={"prefect.resource.id": data_resource(cfg.data.dir)})],
        description=f"Runs {model} when `modelforge data-changed` reports a new version of {cfg.data.dir}.",
    )
    assert isinstance(nightly, RunnerDeployment) and isinstance(on_new_data, RunnerDeployment)  # sync: see above
    deploy(
        nightly,
        on_new_data,
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )
    return [d for d in list_deployments() if d.model == model]
