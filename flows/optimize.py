"""The main pipeline: data -> search -> train -> compress -> export -> validate -> register -> ship.

Wiring only; each stage lives in `tasks/`.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from flows.release import validate_and_release
from flows.search import search_trials
from tasks.compress.recipe import compress_candidate_task
from tasks.config import PipelineConfig
from tasks.core import tracking
from tasks.data.version import version_data_task
from tasks.pipeline_run import already_done, pipeline_run
from tasks.release.evaluate import ClassifierEval
from tasks.release.promote import check_champion_task
from tasks.release.validate import BASELINE
from tasks.search.fetch import worker_data
from tasks.search.runner import search_runner
from tasks.search.summary import summarize_search_task
from tasks.search.trials import TrialTracking, fit_search_to_data
from tasks.train.stage import check_model_inputs_task, train_model_task


@flow(name="optimize", log_prints=True)  # the search subflow brings its own task runner, from the config
def optimize(
    config_path: str = "configs/digits.yaml",
    root: str = ".",
    force: bool = False,
    lock_wait_s: float = 0,
    overrides: list[str] | None = None,
) -> dict:
    with pipeline_run(config_path, root, lock_wait_s=lock_wait_s, overrides=tuple(overrides or ())) as run:
        cfg, work = run.cfg, run.cfg.workdir
        assert isinstance(cfg, PipelineConfig)  # pipeline_run checked the family
        runner = search_runner(
            cfg.search, cfg.runner, cfg.tracking.uri
        )  # a runner that cannot work fails before any data or training

        data = version_data_task(cfg.data, run.root)
        tracking.log_dataset(run.run_id, data.dir, data.md5)
        if skipped := already_done(run, data.md5, force):
            return skipped
        check_model_inputs_task(
            cfg.train, cfg.model, data.num_classes, data.input_shape, run.root
        )  # before any training
        check_champion_task(cfg.register_.model_name, data.dir, cfg.promote)

        search_cfg = fit_search_to_data(cfg.search, data.input_shape, cfg.data.dataset == "text", cfg.model)
        study = f"{cfg.tracking.experiment}-{data.md5[:12]}-{cfg.section_hash('search', 'model')}"
        search_trials.with_options(task_runner=runner)(  # type: ignore[arg-type]  # Prefect types TaskRunner invariant in its future; any runner serves
            search_cfg,
            worker_data(data, cfg.runner),
            work / "search",
            study,
            TrialTracking(cfg.tracking.uri, run.experiment_id, run.run_id),
            remote=cfg.runner.kind != "local",
        )
        search = summarize_search_task(search_cfg, work / "search", study, run.run_id)
        tracking.log_stage(run.run_id, "search", search.flat())

        trained = train_model_task(cfg.train, search.best_params, data.dir, data.md5, work / "train")
        tracking.log_stage(run.run_id, "train", asdict(trained))

        recipes = {BASELINE: [], **cfg.compress.candidates}
        candidates = [
            compress_candidate_task(
                name, recipe, trained.checkpoint, data.dir, cfg.train, work / "candidates" / run.run_id
            )
            for name, recipe in recipes.items()
        ]

        return validate_and_release(run, candidates, ClassifierEval(data.dir), data.md5, work / "reports" / run.run_id)
