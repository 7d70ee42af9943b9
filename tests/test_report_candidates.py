import csv

from tasks.release.report import report_candidates
from tasks.release.validate import Report


def test_report_files(tmp_path):
    reports = [
        Report("baseline", "b.onnx", {"accuracy": 0.97}, "accuracy", 1.0, 2.0, 900.0, 4096, 1e-6),
        Report(
            "int8",
            "q.onnx",
            {"accuracy": 0.95},
            "accuracy",
            0.5,
            1.0,
            1900.0,
            1024,
            None,
            failed_gates=["accuracy drop 2.00 pts > 1.00"],
        ),
    ]
    paths = report_candidates(reports, "baseline", tmp_path)
    text = paths["md"].read_text()
    assert "| baseline" in text and "accuracy drop 2.00 pts" in text
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["chosen"] for r in rows] == ["*", ""] and rows[1]["passed"] == "NO"
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
