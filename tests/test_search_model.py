import itertools
import threading

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tasks.config import parse_config
from tasks.core.settings import ConfigError
from tasks.core.tracking import TrackingConfig, setup_tracking, start_run
from tasks.search import study as study_mod
from tasks.search import summary as summary_mod
from tasks.search import trials as search_mod
from tasks.search.space import SearchConfig


@pytest.fixture()
def tracking(tmp_path):
    exp = setup_tracking(
        TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="search", artifact_dir=tmp_path / "art")
    )
    return search_mod.TrialTracking(f"sqlite:///{tmp_path}/mlflow.db", exp, start_run(exp, "parent"))


FAST = {"families": ["mlp"], "depth": (1, 1), "width": (16, 32), "batch_sizes": [64]}


def small(**kw) -> SearchConfig:
    space = kw.pop("space", FAST)
    return SearchConfig(**{"n_trials": 3, "epochs": 1, "space": space, **kw})


def study_of(result):
    return optuna.load_study(study_name=result.study_name, storage=study_mod.storage_of(result.storage))


def test_same_seed_same_trials(data_dir, tmp_path):
    a = search_mod.search_model(small(seed=3), data_dir, tmp_path / "a", "s")
    b = search_mod.search_model(small(seed=3), data_dir, tmp_path / "b", "s")
    assert [t.params for t in study_of(a).trials] == [t.params for t in study_of(b).trials]
    assert a.best_values == b.best_values
    c = search_mod.search_model(small(seed=4), data_dir, tmp_path / "c", "s")
    assert [t.params for t in study_of(c).trials] != [t.params for t in study_of(a).trials]


def frozen(trials) -> list[tuple]:
    """What a resumed study must keep of a finished trial: its number, params, values and finish time."""
    return [(t.number, t.params, t.values, t.datetime_complete) for t in trials]


def test_resume_runs_only_the_missing_trials(data_dir, tmp_path):
    first = search_mod.search_model(small(), data_dir, tmp_path, "resume")
    assert first.completed_trials == 3
    before = frozen(study_of(first).trials)
    more = search_mod.search_model(small(n_trials=5), data_dir, tmp_path, "resume")
    assert (
        more.completed_trials == 5 and frozen(study_of(more).trials)[:3] == before
    )  # the first three kept as they were
    assert search_mod.run_trials(small(n_trials=5), data_dir, tmp_path, "resume") == 0  # nothing left to run
    assert len(study_of(more).trials) == 5


def test_interrupted_study_resumes_without_losing_trials(data_dir, tmp_path, monkeypatch):
    real_fit = search_mod.fit
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C / a killed worker in the middle of trial #2
        return real_fit(*a, **k)

    monkeypatch.setattr(search_mod, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search_mod.search_model(small(n_trials=4), data_dir, tmp_path, "ctrl-c")
    storage = study_mod.storage_of(study_mod.resolve_storage(small(), tmp_path))
    before = frozen(optuna.load_study(study_name="ctrl-c", storage=storage).trials[:2])
    monkeypatch.setattr(search_mod, "fit", real_fit)
    result = search_mod.search_model(small(n_trials=4), data_dir, tmp_path, "ctrl-c")
    trials = study_of(result).trials
    # The two finished before the interrupt kept as they were; the interrupted one recorded as failed with
    # its error (README: failed trials stay recorded and do not count); two more to make up the 4.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert frozen(trials[:2]) == before
    assert trials[2].user_attrs["error"].startswith("KeyboardInterrupt")
    assert result.completed_trials == 4 and result.failed_trials == 1


def test_crashing_trial_does_not_kill_the_study(data_dir, tmp_path, tracking, monkeypatch):
    real_fit = search_mod.fit
    calls = {"n": 0}

    def flaky_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out-of-memory")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(search_mod, "fit", flaky_fit)
    result = search_mod.search_model(small(), data_dir, tmp_path, "flaky", tracking)
    assert (result.completed_trials, result.failed_trials) == (3, 1)
    failed = [t for t in study_of(result).trials if t.state == TrialState.FAIL]
    assert failed[0].user_attrs["error"] == "RuntimeError: simulated out-of-memory"
    runs = MlflowClient().search_runs([tracking.experiment_id], "attributes.status = 'FAILED'")
    assert any("simulated out-of-memory" in r.data.tags.get("error", "") for r in runs)


def test_all_trials_failing_is_an_error(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(search_mod, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(summary_mod.SearchError, match=r"(?s)no trial completed \(3 failed.*RuntimeError: boom"):
        search_mod.search_model(small(), data_dir, tmp_path, "dead")


def test_grid_visits_exactly_the_grid(data_dir, tmp_path):
    space = {
        **FAST,
        "optimizers": ["adam", "sgd"],
        "lr": (0.01, 0.01),
        "dropout": (0.0, 0.0),
        "channels": (8, 8),
        "schedules": ["constant"],
        "activations": ["relu"],
        "weight_decay": [0.0],
    }
    result = search_mod.search_model(
        small(sampler="grid", grid_points=2, n_trials=50, space=space), data_dir, tmp_path, "grid"
    )
    visited = sorted((t.params["optimizer"], t.params["width"]) for t in study_of(result).trials)
    assert visited == sorted(itertools.product(["adam", "sgd"], [16, 32]))


def dominates(a, b, directions):
    better = [(x >= y) if d == "maximize" else (x <= y) for x, y, d in zip(a, b, directions, strict=True)]
    strictly = [(x > y) if d == "maximize" else (x < y) for x, y, d in zip(a, b, directions, strict=True)]
    return all(better) and any(strictly)


def test_multi_objective_front_is_non_dominated_and_selection_respects_budget(data_dir, tmp_path, tracking):
    space = {**FAST, "width": (4, 64)}
    cfg = small(
        sampler="nsga2",
        objectives=["accuracy", "size"],
        n_trials=8,
        space=space,
        selection="accuracy_under_size",
        size_budget_params=1500,
    )
    result = search_mod.search_model(cfg, data_dir, tmp_path, "mo", tracking)
    study = study_of(result)
    directions = ["maximize", "minimize"]
    front = [f["values"] for f in result.pareto_front]
    front_vals = [(v["accuracy"], v["size"]) for v in front]
    for a, b in itertools.permutations(front_vals, 2):
        assert not dominates(a, b, directions)
    complete = [tuple(t.values) for t in study.trials if t.state == TrialState.COMPLETE]
    for v in complete:
        assert v in front_vals or any(dominates(f, v, directions) for f in front_vals)
    feasible = [v for v in front_vals if v[1] <= 1500]
    assert feasible and len(feasible) < len(front_vals)  # the budget splits the front (seeded: always)
    assert result.best_values["accuracy"] == max(v[0] for v in feasible)  # the most accurate under the budget
    assert result.best_values["size"] <= 1500
    arts = {a.path for a in MlflowClient().list_artifacts(tracking.parent_run_id, "search")}
    assert {"search/pareto.png", "search/trials.csv", "search/summary.json"} <= arts
    with pytest.raises(summary_mod.SearchError, match="no Pareto-optimal trial meets accuracy_under_size"):
        summary_mod.summarize_search(cfg.model_copy(update={"size_budget_params": 1}), tmp_path, "mo")


def test_latency_objective_is_measured_on_onnx_runtime(data_dir, tmp_path, monkeypatch):
    import onnxruntime

    from tasks.onnx import runtime

    measured = []

    def spy(sessions, *a, **k):  # the timer the trials must use, on the sessions they must hand it
        timing = real(sessions, *a, **k)
        measured.extend((type(s), timing[name].latency_p50_ms) for name, s in sessions.items())
        return timing

    real = runtime.measure_speeds
    monkeypatch.setattr(runtime, "measure_speeds", spy)
    cfg = small(
        objectives=["accuracy", "latency"], n_trials=2, selection="accuracy_under_latency", latency_budget_ms=1000.0
    )
    result = search_mod.search_model(cfg, data_dir, tmp_path, "lat")
    trials = study_of(result).trials
    assert len(trials) == 2 and [kind for kind, _ in measured] == [onnxruntime.InferenceSession] * 2
    assert [t.values[1] for t in trials] == [ms for _, ms in measured]  # each trial's latency is its session's p50
    assert all(0 < ms < 1000 for _, ms in measured)


def test_concurrent_workers_fill_one_study(data_dir, tmp_path):
    cfg = small(workers=2, n_trials=4, sampler="random")
    assert study_mod.resolve_storage(cfg, tmp_path).startswith("journal:///")
    errors, ran = [], {}

    def worker(i):
        try:
            ran[i] = search_mod.run_trials(cfg, data_dir, tmp_path, "par", worker=i)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ran[0] >= 1 and ran[1] >= 1, ran  # both workers took trials from the one study
    result = summary_mod.summarize_search(cfg, tmp_path, "par")
    assert 4 <= result.completed_trials <= 5  # at most one overshoot per extra worker
    assert sum(ran.values()) == result.completed_trials
    assert result.failed_trials == 0


def test_pruner_stops_hopeless_trials(data_dir, tmp_path):
    # Plain SGD at lr 1e-4 barely moves in 6 epochs while Adam at 1e-2 converges: the median pruner
    # must cut some SGD trials once three trials have set the bar.
    space = {**FAST, "optimizers": ["sgd", "adam"], "lr": (1e-4, 1e-2)}
    result = search_mod.search_model(
        small(pruner="median", n_trials=12, epochs=6, space=space, sampler="random"), data_dir, tmp_path, "prune"
    )
    assert result.pruned_trials >= 1 and result.completed_trials + result.pruned_trials >= 12


def test_search_config_rejects_impossible_strategies():
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "search": {
                    "objectives": ["accuracy", "latency"],
                    "pruner": "median",
                    "sampler": "cmaes",
                    "selection": "accuracy_under_size",
                }
            }
        )
    msg = str(err.value)
    assert "cannot prune" in msg and "cmaes is single-objective" in msg
    assert "needs 'size' in objectives" in msg and "needs size_budget_params" in msg
    with pytest.raises(ConfigError, match="kernels: 4"):
        parse_config({"search": {"space": {"kernels": [3, 4]}}})


def test_greedy_moves_one_parameter_from_the_incumbent_and_restarts_when_stale():
    from tasks.search.greedy import GreedySampler

    def objective(trial):  # a smooth bowl over a float, a log int and a categorical: optimum x=1.3, y=8, c="b"
        x, y = trial.suggest_float("x", -5, 5), trial.suggest_int("y", 1, 64, log=True)
        c = trial.suggest_categorical("c", ["a", "b", "c"])
        return -((x - 1.3) ** 2) - (y.bit_length() - 4) ** 2 - (0 if c == "b" else 2)

    study = optuna.create_study(direction="maximize", sampler=GreedySampler(seed=0, patience=4))
    study.optimize(objective, n_trials=60)
    assert study.best_value > -0.5
    moves = [t for t in study.trials if "greedy:from_trial" in t.system_attrs]
    assert len(moves) > 30
    for t in moves:
        source = study.trials[t.system_attrs["greedy:from_trial"]]
        assert [k for k in t.params if t.params[k] != source.params[k]] == [t.system_attrs["greedy:moved"]]
    restarts = [t for t in study.trials[4:] if "greedy:from_trial" not in t.system_attrs]
    assert restarts, "a stale climb must restart from a random point"


@pytest.mark.parametrize("sampler", ["greedy", "genetic"])
def test_new_samplers_run_resumable_pipeline_studies(sampler, data_dir, tmp_path, tracking):
    cfg = small(sampler=sampler, n_trials=6, seed=1, population=2 if sampler == "genetic" else None)
    first = search_mod.search_model(
        small(sampler=sampler, n_trials=3, seed=1, population=cfg.population), data_dir, tmp_path, "s", tracking
    )
    resumed = search_mod.search_model(cfg, data_dir, tmp_path, "s", tracking)  # the same study, 3 more trials
    assert first.completed_trials == 3 and resumed.completed_trials == 6
    trial_runs = MlflowClient().search_runs(
        [tracking.experiment_id], f"tags.mlflow.parentRunId = '{tracking.parent_run_id}'"
    )
    assert len(trial_runs) == 6 and all(r.info.status == "FINISHED" for r in trial_runs)


def test_sampler_settings_are_validated():
    with pytest.raises(ConfigError) as err:
        parse_config({"search": {"sampler": "hill", "greedy_patience": 0, "mutation_prob": 1.5, "population": 1}})
    for key in ("search.sampler", "search.greedy_patience", "search.mutation_prob", "search.population"):
        assert key in str(err.value)


def test_genetic_is_not_nsga2_under_another_name():
    def objective(trial):
        return -sum((trial.suggest_float(k, -3, 3) - 1) ** 2 for k in "abcd")

    trials = {}
    for sampler in ("nsga2", "genetic"):
        study = optuna.create_study(
            direction="maximize", sampler=study_mod.make_sampler(small(sampler=sampler, population=6))
        )
        study.optimize(objective, n_trials=24)
        trials[sampler] = [t.params for t in study.trials]
    assert trials["nsga2"][:6] == trials["genetic"][:6]  # the same random first generation (same seed)
    assert trials["nsga2"][6:] != trials["genetic"][6:]  # then different crossover


def test_cross_validated_trials_score_the_mean_fold_curve(data_dir, splits, tmp_path, tracking):
    folds = search_mod.cv_folds(splits, 3, seed=0)
    rows = len(splits.train[1]) + len(splits.val[1])
    assert [len(val[1]) for _, val in folds] == pytest.approx([rows / 3] * 3, abs=1)
    assert sum(len(val[1]) for _, val in folds) == rows  # every train + val row validates exactly once
    cfg = small(n_trials=2, cv_folds=3)
    search_mod.run_trials(cfg, data_dir, tmp_path, "cv", tracking)
    trials = study_mod.open_run_study(cfg, tmp_path, "cv").get_trials()
    client = MlflowClient(tracking.uri)
    for trial in trials:
        run = client.search_runs([tracking.experiment_id], f"tags.`optuna.trial` = '{trial.number}'")[0]
        curve = [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert len(curve) == cfg.epochs and trial.values[0] == pytest.approx(max(curve))
