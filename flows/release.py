"""The second half every pipeline shares: validate the candidates, gate, report, register, ship
and promote. Wiring only; `evaluator` says what quality means for the model family."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tasks.compress.base import Candidate
from tasks.config import EncoderPipelineConfig, PipelineConfig
from tasks.core import tracking
from tasks.pipeline_run import PipelineRun
from tasks.release.evaluate import Evaluator
from tasks.release.promote import check_release_task, promote_model_task
from tasks.release.register import register_model_task
from tasks.release.report import report_candidates_task
from tasks.release.ship import ship_bundle_task
from tasks.release.validate import (
    apply_gates,
    best_passing,
    require_passing,
    validate_candidates_task,
)


def validate_and_release(
    run: PipelineRun, candidates: list[Candidate], evaluator: Evaluator, data_version: str, reports_dir: Path
) -> dict:
    cfg = run.cfg
    assert isinstance(cfg, PipelineConfig | EncoderPipelineConfig)  # the causal LM releases in flows/lm.py
    reports = apply_gates(validate_candidates_task(candidates, cfg.validate_, evaluator), cfg.gates)
    chosen = best_passing(reports, cfg.gates)
    summary = report_candidates_task(reports, chosen.name if chosen else None, reports_dir)
    tracking.log_candidates(run.run_id, candidates, reports, summary)
    chosen = require_passing(chosen, reports)
    onnx = Path(chosen.onnx)
    check_release_task(cfg.register_.model_name, onnx, evaluator, cfg.promote)  # before registering

    registered = register_model_task(onnx, cfg.register_, run.run_id, evaluator)
    bundle = ship_bundle_task(
        onnx,
        cfg.register_.bundle_dir,
        evaluator,
        data_version,
        {
            "candidate": chosen.name,
            "metrics": chosen.to_dict(),
            "mlflow_run_id": run.run_id,
            "registered_model": asdict(registered),
        },
    )
    tracking.log_release(run.run_id, bundle, chosen.name, registered.version, evaluator.primary)

    decision = promote_model_task(registered, bundle, cfg.promote, cfg.validate_, evaluator, run.run_id)
    tracking.name_run(
        run.run_id,
        f"{data_version[:8]} {chosen.name} {evaluator.primary} {chosen.score:.4f} "
        f"v{registered.version}{' champion' if decision.promoted else ''}",
    )
    return {
        "run_id": run.run_id,
        "data_version": data_version,
        "chosen": chosen.name,
        "bundle": str(bundle),
        "model_uri": registered.model_uri,
        "version": registered.version,
        "promoted": decision.promoted,
        "promotion_reason": decision.reason,
    }
