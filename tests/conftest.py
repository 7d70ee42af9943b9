"""Shared fixtures: the real digits data in a temp folder and small trained models.

Every tool gets state in a per-session temp folder, set before prefect/mlflow are imported.
"""

import os
import tempfile
from pathlib import Path

from flows.cli import embedded_defaults

_STATE = Path(tempfile.mkdtemp(prefix="modelforge-tests-"))
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")  # forced: never the developer's own Prefect state
embedded_defaults(_STATE)

import pytest
import torch

from tasks.data import load_splits
from tasks.data.digits import (
    DataConfig,
    materialize_digits,
)
from tasks.models import Arch, build_model, save_checkpoint
from tasks.train.loop import TrainParams, fit
from tasks.train.stage import TrainConfig


@pytest.hookimpl(optionalhook=True)  # a run without pytest-xdist (`-p no:xdist`) has no such hook
def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (`make test` runs two workers): a test module that builds a module-scoped fixture (a
    shipped project, a running server) goes to one worker whole, so the fixture is built once as in a serial
    run; every other test goes to whichever worker is free. Biggest units first (xdist's scope reorder)."""
    import functools

    from xdist.scheduler import LoadScopeScheduling

    @functools.cache
    def shares_a_module_fixture(path: str) -> bool:
        return 'scope="module"' in (config.rootpath / path).read_text()

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if shares_a_module_fixture(path) else nodeid

    return ModuleFixtureScheduling(config, log)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data"
    materialize_digits(DataConfig(), path)
    return path


@pytest.fixture(scope="session")
def splits(data_dir):
    return load_splits(data_dir)


def train_small(arch: Arch, splits, path: Path, epochs: int = 15) -> Path:
    torch.manual_seed(0)
    model = build_model(arch)
    params = TrainParams(lr=0.01, optimizer="adam", epochs=epochs, patience=epochs)
    fit(model, splits.train, splits.val, params)
    return save_checkpoint(path, model, arch, {"train": params.__dict__})


@pytest.fixture(scope="session")
def cnn_checkpoint(splits, tmp_path_factory) -> Path:
    arch = Arch("cnn", 10, (1, 8, 8), conv=(8, 16), hidden=(32,))
    return train_small(arch, splits, tmp_path_factory.mktemp("cnn") / "cnn.pt")


@pytest.fixture(scope="session")
def mlp_checkpoint(splits, tmp_path_factory) -> Path:
    arch = Arch("mlp", 10, (1, 8, 8), hidden=(32, 32))
    return train_small(arch, splits, tmp_path_factory.mktemp("mlp") / "mlp.pt")


def warm_started_trials(project: Path) -> list:
    """The trials of the project's newest study that were enqueued from an earlier study's best."""
    import optuna

    storage = f"sqlite:///{project}/.modelforge/search/optuna.db"
    newest = max(optuna.get_all_study_summaries(storage), key=lambda s: s.datetime_start)
    return [
        t
        for t in optuna.load_study(study_name=newest.study_name, storage=storage).get_trials()
        if "warm_start_from" in t.user_attrs
    ]


@pytest.fixture(scope="session")
def train_cfg() -> TrainConfig:
    return TrainConfig(max_epochs=4, patience=5)


@pytest.fixture(scope="session")
def cnn_onnx(cnn_checkpoint, data_dir, train_cfg, tmp_path_factory) -> Path:
    """The small CNN's baseline candidate: exported, with parity checked."""
    from tasks.compress.recipe import compress_candidate

    return compress_candidate(
        "baseline", [], cnn_checkpoint, data_dir, train_cfg, tmp_path_factory.mktemp("cnn-onnx")
    ).onnx


@pytest.fixture(scope="session")
def cnn_bundle(cnn_onnx, data_dir, tmp_path_factory) -> Path:
    """The small CNN shipped as a bundle, as the release stage ships one (its candidate metrics carry an
    absolute path). Shared by the session: tests serve or publish copies of it, never change it."""
    from tasks.release.evaluate import ClassifierEval
    from tasks.release.ship import ship_bundle

    return ship_bundle(
        cnn_onnx,
        tmp_path_factory.mktemp("cnn-bundle") / "bundle",
        ClassifierEval(data_dir),
        "v1.dir",
        {"candidate": "baseline", "metrics": {"onnx": str(cnn_onnx)}},
    )


def serve_bundle(bundle: Path, payload: dict, truth: list | None = None) -> tuple[dict, float | None]:
    """POST `payload` to /predict on a real server of the shipped `bundle` and check what every served
    classifier owes: 200, the sha256 of the bundle's model file, each label the class of its logits'
    argmax, probabilities summing to 1. Returns the answer and, given the true classes, the accuracy."""
    import json

    import numpy as np

    from deploy.loadtest import request, running_server
    from serve.app import create_app
    from serve.settings import ServeSettings
    from serve.sources import BundleSource
    from tasks.release.ship import sha256_of

    manifest = json.loads((bundle / "manifest.json").read_text())
    with running_server(create_app(BundleSource(bundle), ServeSettings(poll_seconds=60))) as (host, port):
        status, body = request(host, port, "POST", "/predict", payload)
    assert status == 200, body
    assert body["model_sha256"] == manifest["sha256"] == sha256_of(bundle / manifest.get("model_file", "model.onnx"))
    names = manifest.get("labels") or list(range(len(body["logits"][0])))
    assert body["labels"] == [names[i] for i in np.argmax(body["logits"], axis=1)]
    assert np.allclose([sum(p.values()) for p in body["probabilities"]], 1, atol=1e-4)
    if truth is None:
        return body, None
    assert len(truth) == len(body["labels"])
    return body, float(np.mean([str(got) == str(want) for got, want in zip(body["labels"], truth, strict=True)]))


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for every in-process flow run of the session: each start of the
    test harness's server costs about 12 s, and a harness per module cost the suite over 2 minutes.
    Once started it serves the rest of the session (its settings are process-global), so a test that
    needs another API, as the deployments' real server, sets its own with `temporary_settings`."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):  # its 30 s default times out on 2 busy cores
        yield


@pytest.fixture(autouse=True)
def _no_stop_request_leaks():
    """A failed in-process pipeline run asks running stages to stop; the next test starts clean."""
    from tasks.core.stop import clear_stop

    yield
    clear_stop()
