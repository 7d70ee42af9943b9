"""The causal-LM pipeline: model + corpus -> LoRA fine-tune, merged (when enabled) -> FP32 ONNX for generation
(parity vs PyTorch) -> weight-only INT4/INT8 candidates (fixed and searched) -> validate + gates -> report ->
register -> ship -> promote. A fine-tuned run's table also holds the base model at FP32 and the fixed recipes.

Wiring only; each stage lives in `tasks/lm/` (the candidate table and MLflow logging are the shared stages).
"""

from __future__ import annotations

from dataclasses import asdict, replace

from prefect import flow

from tasks.config import LMPipelineConfig
from tasks.core import tracking
from tasks.core.fingerprint import code_version
from tasks.data.version import version_data_task
from tasks.lm.adapter import Adapted
from tasks.lm.evaluate import LMEval
from tasks.lm.export import export_lm_task
from tasks.lm.model import prepare_model_task
from tasks.lm.quantize import layer_sensitivity_task
from tasks.lm.release import (
    MODEL_DIR,
    apply_lm_gates,
    promote_lm_task,
    register_lm_task,
    ship_lm_task,
    validate_lm_task,
)
from tasks.lm.search import make_candidate_task, search_lm_task
from tasks.lm.train import REFERENCE, finetune_lm_task, mark_reference
from tasks.pipeline_run import already_done, pipeline_run
from tasks.release.evaluate import data_task
from tasks.release.promote import check_champion_task
from tasks.release.report import report_candidates_task
from tasks.release.validate import best_passing, require_passing
from tasks.search.trials import TrialTracking


@flow(name="optimize-lm", log_prints=True)
def optimize_lm(
    config_path: str = "configs/smollm2.yaml",
    root: str = ".",
    force: bool = False,
    lock_wait_s: float = 0,
    overrides: list[str] | None = None,
) -> dict:
    with pipeline_run(
        config_path, root, "optimize-lm", family="causal_lm", lock_wait_s=lock_wait_s, overrides=tuple(overrides or ())
    ) as run:
        cfg, work = run.cfg, run.cfg.workdir / "lm"
        assert isinstance(cfg, LMPipelineConfig)  # pipeline_run checked the family
        hf_dir = prepare_model_task(cfg.lm.model, work / "source")
        data = version_data_task(cfg.data, run.root)
        if skipped := already_done(run, data.md5, force):
            return skipped
        check_champion_task(cfg.register_.model_name, data.dir, cfg.promote)

        out = work / "candidates" / run.run_id
        key = f"{data.md5}/{code_version()}/{cfg.section_hash('lm', 'finetune')}"
        base_dir = hf_dir
        if cfg.finetune.enabled:
            tuned = finetune_lm_task(
                base_dir,
                data.dir,
                cfg.finetune,
                work / "finetune" / run.run_id,
                work / "finetune-search",
                key,
                TrialTracking(cfg.tracking.uri, run.experiment_id, run.run_id),
            )
            hf_dir = tuned.merged
        evaluator = LMEval(data.dir, out / "baseline", cfg.data.window, cfg.data.max_windows, cfg.validate_.threads)
        parity_windows = LMEval(data.dir, hf_dir, cfg.data.window, 2, cfg.validate_.threads).windows("validation")
        baseline = export_lm_task(hf_dir, out / "baseline", cfg.lm.max_length, parity_windows, cfg.validate_.threads)
        base, adapted = None, None
        if cfg.finetune.enabled:  # the base model at FP32: a reference row, and the weights a separate adapter uses
            base = replace(
                export_lm_task(
                    base_dir, out / f"{REFERENCE}fp32", cfg.lm.max_length, parity_windows, cfg.validate_.threads
                ),
                name=f"{REFERENCE}fp32",
            )
            adapted = Adapted(base.checkpoint, tuned.adapter)
        ranked = (
            layer_sensitivity_task(
                baseline.checkpoint,
                evaluator.windows("calibration", cfg.compress.search.trial_windows),
                cfg.validate_.threads,
            )
            if cfg.compress.uses_sensitivity
            else []
        )
        tracking.log_json(run.run_id, ranked, "candidates/layer_sensitivity.json")
        sensitive = [r["layer"] for r in ranked]
        searched = search_lm_task(
            baseline.checkpoint,
            evaluator,
            cfg.compress.search,
            cfg.validate_,
            cfg.lm.max_length,
            sensitive,
            cfg.gates.max_ppl_increase_pct,
            work / "search",
            key,
        )
        recipes = [*cfg.compress.candidates.items(), *searched]
        candidates = [baseline] + [
            make_candidate_task(name, recipe, baseline.checkpoint, out, sensitive, adapted) for name, recipe in recipes
        ]
        references = []
        if base is not None:  # the base model on the same text, at FP32 and the fixed recipes: never shipped
            references = [base] + [
                make_candidate_task(f"{REFERENCE}{name}", recipe, base.checkpoint, out, sensitive)
                for name, recipe in cfg.compress.candidates.items()
                if recipe.adapter == "merged"  # on the base model a separate adapter's recipe is its merged twin
            ]

        reports = mark_reference(
            apply_lm_gates(
                validate_lm_task(candidates + references, evaluator, cfg.validate_, cfg.lm.max_length), cfg.gates
            )
        )
        chosen = best_passing(reports, cfg.gates)
        summary = report_candidates_task(reports, chosen.name if chosen else None, work / "reports" / run.run_id)
        tracking.log_candidates(run.run_id, candidates + references, reports, summary)
        chosen = require_passing(chosen, reports)

        folder = next(c.checkpoint for c in candidates if c.name == chosen.name)
        registered = register_lm_task(folder, cfg.register_, run.run_id, chosen.to_dict())
        bundle = ship_lm_task(
            folder,
            cfg.register_.bundle_dir,
            cfg.lm.max_length,
            data.md5,
            {
                "candidate": chosen.name,
                "model_name": registered.name,
                "version": registered.version,
                "registered_model": asdict(registered),
                "task": data_task(data.dir),
                "metrics": chosen.to_dict(),
                "mlflow_run_id": run.run_id,
            },
        )
        tracking.log_release(run.run_id, bundle, chosen.name, registered.version, "top1")
        decision = promote_lm_task(
            registered, bundle, cfg.promote, cfg.validate_, evaluator, cfg.lm.max_length, run.run_id
        )
        return {
            "run_id": run.run_id,
            "data_version": data.md5,
            "chosen": chosen.name,
            "bundle": str(bundle),
            "model_dir": str(bundle / MODEL_DIR),
            "model_uri": registered.model_uri,
            "version": registered.version,
            "promoted": decision.promoted,
            "promotion_reason": decision.reason,
        }
