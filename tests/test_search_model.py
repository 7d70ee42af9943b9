import optuna
import pytest

from tasks import search_model as search_mod
from tasks import track_run
from tasks.config import SearchConfig, TrackingConfig


@pytest.fixture()
def tracking(tmp_path):
    exp = track_run.setup_tracking(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="search",
                                                  artifact_dir=tmp_path / "art"))
    parent = track_run.start_run(exp, "parent")
    return exp, parent


def small(**kw) -> SearchConfig:
    return SearchConfig(n_trials=3, epochs=1, **kw)


def test_same_seed_same_trials(data_dir, tmp_path, tracking):
    a = search_mod.search_model(small(seed=3), data_dir, tmp_path / "a", "s", *tracking)
    b = search_mod.search_model(small(seed=3), data_dir, tmp_path / "b", "s", *tracking)
    assert a.best_params == b.best_params and a.best_value == b.best_value
    study = optuna.load_study(study_name="s", storage=a.storage)
    assert len(study.trials) == 3


def test_resume_runs_only_the_missing_trials(data_dir, tmp_path, tracking):
    first = search_mod.search_model(small(), data_dir, tmp_path, "resume", *tracking)
    assert first.completed_trials == 3
    more = search_mod.search_model(SearchConfig(n_trials=5, epochs=1), data_dir, tmp_path, "resume", *tracking)
    assert more.completed_trials == 5
    again = search_mod.search_model(SearchConfig(n_trials=5, epochs=1), data_dir, tmp_path, "resume", *tracking)
    study = optuna.load_study(study_name="resume", storage=again.storage)
    assert len(study.trials) == 5  # nothing re-run


def test_crashing_trial_does_not_kill_the_study(data_dir, tmp_path, tracking, monkeypatch):
    real_fit = search_mod.fit
    calls = {"n": 0}

    def flaky_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out-of-memory")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(search_mod, "fit", flaky_fit)
    result = search_mod.search_model(small(), data_dir, tmp_path, "flaky", *tracking)
    assert (result.completed_trials, result.failed_trials) == (2, 1)
    from mlflow.tracking import MlflowClient
    failed = MlflowClient().search_runs([tracking[0]], "attributes.status = 'FAILED'")
    assert any("simulated out-of-memory" in r.data.tags.get("error", "") for r in failed)


def test_all_trials_failing_is_an_error(data_dir, tmp_path, tracking, monkeypatch):
    monkeypatch.setattr(search_mod, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="all 3 trials failed"):
        search_mod.search_model(small(), data_dir, tmp_path, "dead", *tracking)


def test_trials_are_nested_mlflow_runs(data_dir, tmp_path, tracking):
    from mlflow.tracking import MlflowClient
    search_mod.search_model(small(), data_dir, tmp_path, "nested", *tracking)
    children = MlflowClient().search_runs([tracking[0]], f"tags.mlflow.parentRunId = '{tracking[1]}'")
    assert len(children) >= 3
    history = MlflowClient().get_metric_history(children[0].info.run_id, "val_accuracy")
    assert len(history) == 1 and "lr" in children[0].data.params
