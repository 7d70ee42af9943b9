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

from tasks.release.validate import Report


def rows(reports: list[Report], chosen: str | None) -> list[dict]:
    """One row per candidate: its quality metrics (whichever the evaluator measured), then speed and size."""
    return [
        {
            "candidate": r.name,
            **{k: f"{v:.4f}" for k, v in r.quality.items()},
            "p50_ms": f"{r.latency_p50_ms:.3f}",
            "p95_ms": f"{r.latency_p95_ms:.3f}",
            "throughput_sps": f"{r.throughput_sps:,.0f}",
            "size_kb": f"{r.size_bytes / 1024:.1f}",
            "parity": "n/a" if r.parity_max_abs is None else f"{r.parity_max_abs:.1e}",
            "passed": "yes" if r.passed else "NO",
            "chosen": "*" if r.name == chosen else "",
            "failed_gates": "; ".join(r.failed_gates),
        }
        for r in reports
    ]


def format_table(table: list[dict]) -> str:
    columns = list(table[0])
    widths = {c: max(len(c), *(len(row[c]) for row in table)) for c in columns}
    line = lambda row: "| " + " | ".join(str(row[c]).ljust(widths[c]) for c in columns) + " |"
    sep = "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"
    return "\n".join([line({c: c for c in columns}), sep, *map(line, table)])


def plot_tradeoff(reports: list[Report], chosen: str | None, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    largest = max(r.size_bytes for r in reports)  # marker area relative to the largest model, MB or KB alike
    for r in reports:
        marker = "*" if r.name == chosen else ("o" if r.passed else "x")
        ax.scatter(
            r.latency_p50_ms,
            r.score,
            s=40 + 200 * r.size_bytes / largest,
            marker=marker,
            color="tab:green" if r.passed else "tab:red",
        )
        ax.annotate(r.name, (r.latency_p50_ms, r.score), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("ONNX Runtime CPU latency p50, batch 1 (ms)")
    ax.set_ylabel(f"{reports[0].primary} (held out)")
    ax.set_title(f"Candidates: {reports[0].primary} vs latency (size = marker area; x = failed a gate, * = chosen)")
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
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    png = plot_tradeoff(reports, chosen, out_dir / "candidates.png")
    if FlowRunContext.get() is not None:  # outside a flow there is no Prefect UI to publish to
        create_table_artifact(table=table, key="candidates", description="Compressed candidates on ONNX Runtime CPU")
    return {"md": md, "csv": csv_path, "png": png}


report_candidates_task = task(name="report_candidates")(report_candidates)
