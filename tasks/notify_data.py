"""Announce a new data version to Prefect, so the on-new-data deployment's trigger starts a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.config import ClassifierData, TextDataConfig
from tasks.version_data import version_data

EVENT = "modelforge.data.changed"


@dataclass(frozen=True)
class DataChange:
    md5: str
    previous: str | None
    emitted: bool


def notify_data_change(cfg: ClassifierData | TextDataConfig, root: Path, marker: Path | None = None) -> DataChange:
    """Version the data folder with DVC (validated by its source, then dvc add + push) and emit EVENT
    when its md5 differs from the last announced one. Needs a real Prefect server (PREFECT_API_URL):
    events sent nowhere are lost."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError("PREFECT_API_URL is not set: start the stack (make serve-stack) so the event reaches it")
    root = Path(root)
    marker = marker or root / ".modelforge" / "last_data_event"
    version = version_data(cfg, root)
    previous = marker.read_text().strip() if marker.exists() else None
    if previous == version.md5:
        return DataChange(version.md5, previous, False)
    event = emit_event(event=EVENT, resource={"prefect.resource.id": f"modelforge.data.{version.md5}",
                                              "prefect.resource.name": str(cfg.dir)},
                       payload={"data_version": version.md5, "previous": previous})
    if event is None:
        raise RuntimeError("Prefect did not accept the event (events client unavailable)")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(version.md5)
    return DataChange(version.md5, previous, True)
