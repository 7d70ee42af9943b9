"""Gaps in a table's numeric columns filled from the row's other numbers: a ridge regression per column with
gaps in train, fitted on the train rows where that column is present, recorded in the manifest's
preprocessing and applied by `encode_records` to training rows and served records alike. The train mean it
replaces ignores what the row says: in wine, a class_1 sample missing its alcohol got the mean of 13.0, where
class_1 wines sit near 12.3, and most models took it for class_0."""

from __future__ import annotations

from typing import Any

import numpy as np


def fit_gap_regressions(columns: list[dict[str, Any]], train) -> None:
    """For each numeric column (a preprocessing entry with its train `mean` and `std`) with gaps in `train`,
    record `impute` (one weight per numeric column, in order, its own 0) and `impute_bias`: its standardised
    value from the others' (a gap there read as their mean)."""
    numeric = [c for c in columns if c["kind"] == "numeric"]
    z = np.stack([((train[c["name"]].astype(float) - c["mean"]) / c["std"]).to_numpy() for c in numeric], 1)
    present = ~np.isnan(z)
    z = np.where(present, z, 0.0)
    for k, col in enumerate(numeric):
        rows = present[:, k]
        if not col["missing_indicator"] or len(numeric) < 2 or rows.sum() < 2:
            continue
        x = np.delete(z[rows], k, axis=1)
        y = z[rows, k]
        mx, my = x.mean(0), y.mean()
        xc = x - mx
        # alpha 1 on standardised inputs: a small table's collinear columns cannot blow the weights up
        w = np.linalg.solve(xc.T @ xc + np.eye(x.shape[1]), xc.T @ (y - my))
        col["impute"] = np.insert(w, k, 0.0).round(8).tolist()
        col["impute_bias"] = round(float(my - mx @ w), 8)


def fill_gaps(out: np.ndarray, columns: list[dict[str, Any]], starts: list[int]) -> None:
    """Fill the gaps of encoded rows `out` (each at its column's mean, its missing indicator set) in every
    column with a regression; `starts[i]` is the first feature of `columns[i]`. Every fill reads the row as
    the regressions were fitted on: its other gaps at their means."""
    numeric = [j for col, j in zip(columns, starts, strict=True) if col["kind"] == "numeric"]
    values = out[:, numeric].copy()
    for col, j in zip(columns, starts, strict=True):
        if "impute" in col:
            rows = out[:, j + 1] == 1  # regressions are fitted for columns with a missing indicator only
            out[rows, j] = values[rows] @ np.asarray(col["impute"], np.float32) + col["impute_bias"]
