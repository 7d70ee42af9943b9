"""The `table` data source: validation, content-hash splits, preprocessing fitted on train and
applied identically when serving, drift, and the real flow end to end with appended rows."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import serve_bundle, warm_started_trials

from deploy.loadtest import request, running_server
from serve.app import create_app
from serve.settings import ServeSettings
from serve.sources import BundleSource
from tasks.data import DataError, load_splits
from tasks.data.base import hash_split, read_manifest
from tasks.data.table import (
    TableDataConfig,
    describe_table,
    encode_records,
    load_table,
    split_rows,
)
from tasks.examples import wine
from tasks.onnx.runtime import make_session, predict_logits


def table_cfg(**kw) -> TableDataConfig:
    return TableDataConfig(dataset="table", label="label", **kw)


@pytest.fixture()
def wine_dir(tmp_path):
    wine(tmp_path / "data")
    return tmp_path / "data"


def test_hash_split_is_stable_under_appends():
    keys = [f"row-{i}" for i in range(2000)]
    before = hash_split(keys, 0.15, 0.2)
    after = hash_split(keys + [f"new-{i}" for i in range(500)], 0.15, 0.2)
    assert (after[:2000] == before).all()  # nothing already there moves
    shares = {s: float((before == s).mean()) for s in ("train", "val", "test")}
    assert shares["test"] == pytest.approx(0.2, abs=0.03) and shares["val"] == pytest.approx(0.15, abs=0.03)


def test_describe_fits_on_train_and_load_encodes_with_it(wine_dir):
    manifest, counts = describe_table(table_cfg(), wine_dir)
    assert manifest["classes"] == ["class_0", "class_1", "class_2"] and manifest["schema"]["site"] == "categorical"
    assert sum(counts.values()) == 178 and manifest["counts"] == counts
    splits = load_splits(wine_dir)
    x_train = splits.train[0]
    # standardised on train (indicator and one-hot columns are 0/1): mean 0, std 1 on train only
    columns = manifest["preprocessing"]["columns"]
    first = next(c for c in columns if c["name"] == "alcohol")
    present = x_train[:, 1] == 0  # alcohol's missing indicator
    assert first["missing_indicator"] and abs(x_train[present, 0].mean()) < 1e-5
    assert not np.allclose(splits.test[0][:, 0].mean(), 0, atol=1e-6)  # test was not used to fit
    assert splits.train[0].shape[1] == manifest["input_shape"][0] == 13 + 6 + 5  # numerics, indicators, sites + unknown
    # the serving path: raw records through the same function give the training rows exactly
    frame = pd.read_csv(wine_dir / "data.csv")
    records = json.loads(frame.drop(columns="label").to_json(orient="records"))  # what a JSON client sends
    encoded = encode_records(manifest["preprocessing"], records)
    assert {tuple(r) for r in np.round(x_train, 5)} <= {tuple(r) for r in np.round(encoded, 5)}


def test_a_gap_is_filled_from_the_rows_other_numbers(tmp_path):
    """A gap in a column with gaps in train is the ridge regression on the row's other numbers (fitted on train,
    recorded in the manifest, the same when serving); a column without gaps in train takes its mean."""
    rng = np.random.default_rng(0)
    a = rng.normal(10, 2, 300)
    frame = pd.DataFrame({"a": a, "b": 3 * a + rng.normal(0, 0.3, 300), "c": rng.normal(0, 1, 300)})
    frame["label"] = np.where(frame.c > 0, "up", "down")
    truth = frame.b.copy()
    gaps = np.arange(300) % 7 == 0
    frame.loc[gaps, "b"] = np.nan
    (tmp_path / "t").mkdir()
    frame.to_csv(tmp_path / "t" / "data.csv", index=False)
    manifest, _ = describe_table(table_cfg(), tmp_path / "t")
    pre = manifest["preprocessing"]
    b = next(c for c in pre["columns"] if c["name"] == "b")
    assert "impute" in b and not any("impute" in c for c in pre["columns"] if c["name"] != "b")
    records = json.loads(frame.drop(columns="label").to_json(orient="records"))
    encoded = encode_records(pre, records)
    filled = encoded[gaps, 1] * b["std"] + b["mean"]  # columns: a, b, b's indicator, c
    assert np.abs(filled - truth[gaps]).max() < 1.5  # 3 a's spread is 6: the mean would be off by up to ~18
    assert (encoded[gaps, 2] == 1).all() and (encoded[~gaps, 2] == 0).all()
    both = encode_records(pre, [{"a": None, "b": None, "c": 0.5}])  # a at its mean, so b at its mean too
    assert abs(both[0, 1]) < 0.05 and both[0, 0] == 0
    splits = load_splits(tmp_path / "t")
    assert {tuple(r) for r in np.round(splits.train[0], 5)} <= {tuple(r) for r in np.round(encoded, 5)}


def test_schema_drift_against_the_previous_version_is_an_error(wine_dir):
    describe_table(table_cfg(), wine_dir)
    frame = pd.read_csv(wine_dir / "data.csv")
    frame["new_col"] = 1.0
    frame["site"] = frame["site"].map({"north": 1, "south": 2, "east": 3, "west": 4})
    frame.loc[:9, "label"] = "class_9"
    frame.drop(columns="hue").to_csv(wine_dir / "data.csv", index=False)
    with pytest.raises(DataError) as err:
        describe_table(table_cfg(), wine_dir)
    text = str(err.value)
    for expected in (
        "new column 'new_col'",
        "column 'hue' is gone",
        "'site' changed type: categorical -> numeric",
        "not in the previous version: class_9",
    ):
        assert expected in text
    describe_table(table_cfg(allow_drift=True, min_class_samples=1), wine_dir)  # an intended change goes through


def test_a_file_changed_after_versioning_is_refused(wine_dir):
    manifest, _ = describe_table(table_cfg(), wine_dir)
    with open(wine_dir / "data.csv", "a") as f:
        f.write(",".join(["1"] * 13) + ",north,class_0\n")
    with pytest.raises(DataError, match="changed since it was versioned"):
        load_table(wine_dir, manifest)


def test_bad_records_name_the_problem(wine_dir):
    manifest, _ = describe_table(table_cfg(), wine_dir)
    with pytest.raises(ValueError) as err:
        encode_records(manifest["preprocessing"], [{"alcohol": "strong"}, "not a record"])
    assert "record 0: column 'alcohol' is numeric, got 'strong'" in str(err.value)
    assert "record 0: missing column 'malic_acid'" in str(err.value) and "record 1: expected an object" in str(
        err.value
    )


TINY = {
    "data": {"dataset": "table", "label": "label"},
    "search": {"n_trials": 3, "epochs": 4, "space": {"lr": [0.005, 0.02], "optimizers": ["adam"], "depth": [1, 1]}},
    "train": {"max_epochs": 30, "patience": 8},
    "compress": {"candidates": {}},
    "validate": {"warmup": 3, "latency_runs": 20, "throughput_runs": 3},
    "gates": {"min_accuracy": 0.8, "max_latency_ratio": None},
    "register": {"model_name": "tiny-wine"},
    "tracking": {"experiment": "e2e-table"},
}


@pytest.mark.e2e
def test_table_flow_ships_serves_records_and_keeps_old_test_rows_in_test_when_rows_are_appended(tmp_path, prefect_api):
    from flows.optimize import optimize

    wine(tmp_path / "data")
    full = pd.read_csv(tmp_path / "data" / "data.csv")
    full.iloc[:140].to_csv(tmp_path / "data" / "data.csv", index=False)  # the first delivery
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    first = optimize(config_path=str(tmp_path / "config.yaml"), root=str(tmp_path))
    bundle = tmp_path / "deploy" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["labels"] == ["class_0", "class_1", "class_2"]
    old_rows, old_split = split_rows(tmp_path / "data", read_manifest(tmp_path / "data"))

    # serving raw rows: class names, probabilities and the same logits as the test arrays
    test_rows = old_rows[old_split == "test"]
    records = json.loads(test_rows.drop(columns="label").to_json(orient="records"))
    body, acc = serve_bundle(bundle, {"records": records}, test_rows["label"].tolist())
    assert acc >= 0.8  # the gate's minimum, met on these very rows
    x = encode_records(manifest["preprocessing"], records)
    np.testing.assert_allclose(body["logits"], predict_logits(make_session(bundle / "model.onnx"), x), atol=1e-5)
    with running_server(create_app(BundleSource(bundle), ServeSettings(poll_seconds=60))) as (host, port):
        status, body = request(host, port, "POST", "/predict", {"records": [{"alcohol": "x"}]})
        assert status == 400 and "column 'alcohol' is numeric" in body["error"]

    # new rows arrive: a new version whose test split still holds every old test row
    full.to_csv(tmp_path / "data" / "data.csv", index=False)
    second = optimize(config_path=str(tmp_path / "config.yaml"), root=str(tmp_path))
    assert second["data_version"] != first["data_version"]
    new_rows, new_split = split_rows(tmp_path / "data", read_manifest(tmp_path / "data"))
    test_now = {
        json.dumps(r, sort_keys=True) for r in json.loads(new_rows[new_split == "test"].to_json(orient="records"))
    }
    old_test_rows = json.loads(old_rows[old_split == "test"].to_json(orient="records"))
    assert len(test_now) > len(old_test_rows) and all(json.dumps(r, sort_keys=True) in test_now for r in old_test_rows)
    # the new study started from the old one's best trials
    warm = warm_started_trials(tmp_path)
    assert len(warm) == 3 and all(t.state.name == "COMPLETE" for t in warm)
