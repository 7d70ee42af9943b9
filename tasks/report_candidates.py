"""The candidate summary: a text table for the console, CSV/Markdown/PNG for MLflow, and a
Prefect table artifact for the Prefect UI."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs in workers and CI without a display
import matplotlib.pyplot as plt
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext

from tasks.validate_model import Report

COLUMNS = ["candidate", "accuracy", "p50_ms", "p95_ms", "throughput_sps", "size_kb", "parity", "passed", "chosen", "failed_gates"]


def rows(reports: list[Report], chosen: str | None) -> list[dict]:
    return [{
        "candidate": r.name,
        "accuracy": f"{r.accuracy:.4f}",
        "p50_ms": f"{r.latency_p50_ms:.3f}",
        "p95_ms": f"{r.latency_p95_ms:.3f}",
        "throughput_sps": f"{r.throughput_sps:,.0f}",
        "size_kb": f"{r.size_bytes / 1024:.1f}",
        "parity": "n/a" if r.parity_max_abs is None else f"{r.parity_max_abs:.1e}",
        "passed": "yes" if r.passed else "NO",
        "chosen": "*" if r.name == chosen else "",
        "failed_gates": "; ".join(r.failed_gates),
    } for r in reports]


def format_table(table: list[dict]) -> str:
    widths = {c: max(len(c), *(len(row[c]) for row in table)) for c in COLUMNS}
    line = lambda row: "| " + " | ".join(str(row[c]).ljust(widths[c]) for c in COLUMNS) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"
    return "\n".join([line({c: c for c in COLUMNS}), sep, *map(line, table)])


def plot_tradeoff(reports: list[Report], chosen: str | None, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reports:
        marker = "*" if r.name == chosen else ("o" if r.passed else "x")
        ax.scatter(r.latency_p50_ms, r.accuracy * 100, s=40 + r.size_bytes / 2000, marker=marker,
                   color="tab:green" if r.passed else "tab:red")
        ax.annotate(r.name, (r.latency_p50_ms, r.accuracy * 100), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("ONNX Runtime CPU latency p50, batch 1 (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Candidates: accuracy vs latency (size = marker area; x = failed a gate, * = chosen)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_candidates(reports: list[Report], chosen: str | None, out_dir: Path) -> dict[str, Path]:
    """Write candidates.md/.csv/.png under `out_dir`, publish the Prefect artifact, print the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows(reports, chosen)
    text = format_table(table)
    print("\n" + text + "\n")
    md = out_dir / "candidates.md"
    md.write_text(text + "\n")
    csv_path = out_dir / "candidates.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    png = plot_tradeoff(reports, chosen, out_dir / "candidates.png")
    if FlowRunContext.get() is not None:  # outside a flow there is no Prefect UI to publish to
        create_table_artifact(table=table, key="candidates", description="Compressed candidates on ONNX Runtime CPU")
    return {"md": md, "csv": csv_path, "png": png}


report_candidates_task = task(report_candidates, name="report_candidates")
