"""Prefect deployments of the pipeline a config names (`optimize`, or `optimize-encoder` for
`family: minilm`) on a local process work pool:

- `nightly`: a cron schedule (02:00 UTC by default);
- `on-new-data`: started by the `modelforge.data.changed` event that `modelforge data-changed`
  emits when the DVC data version changes.

Both need a real Prefect server and a worker (`make serve-stack` starts all of it).
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.events import DeploymentEventTrigger

from tasks.notify_data import EVENT

POOL = "modelforge-process"
NIGHTLY = "nightly"
ON_NEW_DATA = "on-new-data"


def ensure_pool(pool: str = POOL) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass


CODE_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {"classifier": "flows/optimize.py:optimize", "minilm": "flows/encode.py:optimize_encoder"}


def deploy_all(root: Path, config_path: str = "configs/digits.yaml", pool: str = POOL,
               cron: str = "0 2 * * *") -> dict[str, str]:
    """Create or update both deployments for the project at `root`; returns name -> deployment id.
    The worker loads the flow code from this checkout, so deployments run what is checked out."""
    from prefect import Flow

    from tasks.config import load_config

    ensure_pool(pool)
    entrypoint = ENTRYPOINTS[load_config(config_path).family]
    source = Flow.from_source(source=str(CODE_ROOT), entrypoint=entrypoint)
    # A scheduled or triggered run queues behind one already running on the work dir (an hour at most).
    params = {"config_path": str(config_path), "root": str(Path(root).resolve()), "lock_wait_s": 3600}
    ids = {
        NIGHTLY: source.deploy(NIGHTLY, work_pool_name=pool, cron=cron, parameters=params, build=False,
                               push=False, print_next_steps=False,
                               description="Nightly optimisation; skips itself when nothing changed."),
        ON_NEW_DATA: source.deploy(
            ON_NEW_DATA, work_pool_name=pool, parameters=params, build=False, push=False, print_next_steps=False,
            triggers=[DeploymentEventTrigger(expect={EVENT}, match={"prefect.resource.id": "modelforge.data.*"},
                                             parameters=params)],
            description="Runs when modelforge data-changed reports a new DVC data version."),
    }
    return {k: str(v) for k, v in ids.items()}
