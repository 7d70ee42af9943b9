"""Side-by-side view of the last pipeline runs, read back from MLflow."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial

from tasks.core.tracking import TrackingConfig, client, setup_tracking

COLUMNS = ["started", "run", "status", "data_version", "chosen", "quality", "p50_ms", "size_kb", "version", "promotion"]


def compare_runs(tracking: TrackingConfig, last: int = 10) -> list[dict]:
    """The last `last` pipeline runs (trial runs excluded), newest first."""
    experiment_id = setup_tracking(tracking)
    runs = client().search_runs(
        [experiment_id], "tags.config_path LIKE '%'", order_by=["attributes.start_time DESC"], max_results=last
    )
    rows = []
    for r in runs:
        tags, metrics = r.data.tags, r.data.metrics
        chosen, quality = tags.get("chosen_candidate", ""), tags.get("quality_metric", "accuracy")
        metric = partial(_candidate_metric, metrics, chosen)
        rows.append(
            {
                "started": datetime.fromtimestamp(r.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
                "run": r.info.run_id[:8],
                "status": r.info.status if "skipped" not in tags else "SKIPPED",
                "data_version": tags.get("data_version", "")[:12],
                "chosen": chosen,
                "quality": f"{quality} {metric(quality)}" if metric(quality) else "",
                "p50_ms": metric("latency_p50_ms", fmt="{:.3f}"),
                "size_kb": metric("size_bytes", 1 / 1024, "{:.1f}"),
                "version": tags.get("registered_version", ""),
                "promotion": tags.get("promotion.decision", tags.get("skipped", tags.get("error", "")))[:40],
            }
        )
    return rows


def _candidate_metric(metrics: dict[str, float], chosen: str, k: str, scale: float = 1.0, fmt: str = "{:.4f}") -> str:
    return fmt.format(metrics[f"{chosen}.{k}"] * scale) if f"{chosen}.{k}" in metrics else ""


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "no pipeline runs recorded yet"
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    line = lambda r: "  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS)
    return "\n".join([line({c: c for c in COLUMNS}), *map(line, rows)])
