"""Announce a new data version to Prefect, so the on-new-data deployments of the models trained on
that data folder (and no others) start a run."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tasks.data import ClassifierData
from tasks.data.docstrings import TextDataConfig
from tasks.data.version import version_data

EVENT = "modelforge.data.changed"


def data_resource(data_dir: Path) -> str:
    """The resource id of a data folder's events: its absolute path, which names the project too
    (a data folder lies inside its project), so each deployment's trigger matches its own data only."""
    return f"modelforge.data.{Path(data_dir).resolve()}"


@dataclass(frozen=True)
class DataChange:
    md5: str
    previous: str | None
    emitted: bool


def notify_data_change(cfg: ClassifierData | TextDataConfig, root: Path, marker: Path | None = None) -> DataChange:
    """Version the data folder with DVC (validated by its source, then dvc add + push) and emit EVENT
    when its md5 differs from the last one announced for this folder (models on other folders of the
    project keep their own marker). Needs a real Prefect server (PREFECT_API_URL):
    events sent nowhere are lost."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError(
            "no Prefect server: run `modelforge stack start` in the project folder (or set "
            "PREFECT_API_URL) so the event reaches it"
        )
    root = Path(root)
    resource = data_resource(cfg.dir)
    marker = marker or root / ".modelforge" / "data-events" / hashlib.sha256(resource.encode()).hexdigest()[:16]
    version = version_data(cfg, root)
    previous = marker.read_text().strip() if marker.exists() else None
    if previous == version.md5:
        return DataChange(version.md5, previous, False)
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource, "prefect.resource.name": str(cfg.dir)},
        payload={"data_version": version.md5, "previous": previous},
    )
    if event is None:
        raise RuntimeError("Prefect did not accept the event (events client unavailable)")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(version.md5)
    return DataChange(version.md5, previous, True)
