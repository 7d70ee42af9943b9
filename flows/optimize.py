"""The main pipeline: data -> search -> train -> compress -> export -> validate -> register -> ship.

Wiring only; each stage lives in `tasks/`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import track_run
from tasks.compress_model import compress_candidate_task
from tasks.promote_model import promote_model_task
from tasks.register_model import register_model_task
from tasks.report_candidates import report_candidates_task
from tasks.search_model import run_trials_task, summarize_search_task
from tasks.ship_bundle import ship_bundle_task
from tasks.train_model import check_init_checkpoint_task, train_model_task
from tasks.validate_model import BASELINE, apply_gates, best_passing, require_passing, validate_candidates_task
from tasks.version_data import version_data_task


@flow(name="optimize", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def optimize(config_path: str = "configs/digits.yaml", root: str = ".", force: bool = False) -> dict:
    with track_run.pipeline_run(config_path, root) as run:
        cfg, work = run.cfg, run.cfg.workdir

        data = version_data_task(cfg.data, run.root)
        fingerprint = track_run.fingerprint(cfg, data.md5)
        track_run.set_tags(run.run_id, fingerprint)
        previous = None if force else track_run.find_equivalent_run(run.experiment_id, fingerprint, run.run_id)
        if previous:
            return track_run.skip_run(run.run_id, previous, data.md5)
        check_init_checkpoint_task(cfg.train, data.num_classes, data.input_shape)  # fail before any training

        study = f"{cfg.tracking.experiment}-{data.md5[:12]}-{cfg.section_hash('search')}"
        workers = [run_trials_task.submit(cfg.search, data.dir, work / "search", study, run.experiment_id,
                                          run.run_id, worker=i) for i in range(cfg.search.workers)]
        search = summarize_search_task(cfg.search, work / "search", study, run.run_id, wait_for=workers)
        track_run.log_stage(run.run_id, "search", search.flat())

        trained = train_model_task(cfg.train, search.best_params, data.dir, data.md5, work / "train")
        track_run.log_stage(run.run_id, "train", asdict(trained))

        recipes = {BASELINE: [], **cfg.compress.candidates}
        candidates = [compress_candidate_task(name, recipe, trained.checkpoint, data.dir, cfg.train,
                                              work / "candidates" / run.run_id)
                      for name, recipe in recipes.items()]

        reports = apply_gates(validate_candidates_task(candidates, cfg.validate_, data.dir), cfg.gates)
        chosen = best_passing(reports, cfg.gates)
        summary = report_candidates_task(reports, chosen and chosen.name, work / "reports" / run.run_id)
        track_run.log_candidates(run.run_id, candidates, reports, summary)
        require_passing(chosen, reports)

        registered = register_model_task(Path(chosen.onnx), cfg.register_, run.run_id, data.dir)
        bundle = ship_bundle_task(
            Path(chosen.onnx), cfg.register_.bundle_dir, data.dir, data.md5,
            {"candidate": chosen.name, "metrics": chosen.to_dict(), "mlflow_run_id": run.run_id,
             "registered_model": asdict(registered)},
        )
        track_run.log_artifacts(run.run_id, bundle, "bundle")  # what rollback republishes
        track_run.set_tags(run.run_id, {"chosen_candidate": chosen.name, "bundle": str(bundle),
                                        "registered_version": registered.version})

        decision = promote_model_task(registered, bundle, cfg.promote, cfg.validate_, data.dir, run.run_id)
        return {"run_id": run.run_id, "data_version": data.md5, "chosen": chosen.name, "bundle": str(bundle),
                "model_uri": registered.model_uri, "version": registered.version, "promoted": decision.promoted,
                "promotion_reason": decision.reason}
