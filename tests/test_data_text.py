"""The `text` data source and the text model family: vocabulary from train only, the same
tokenisation for training and serving, validation, and the real flow end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import serve_bundle

from deploy.loadtest import request, running_server
from serve.app import create_app
from serve.settings import ServeSettings
from serve.sources import BundleSource
from tasks.data import load_splits
from tasks.data.text import TextTableConfig, describe_text, encode_texts, split_texts

TOPICS = {
    "space": "rocket orbit planet launch star moon",
    "food": "bread cheese soup cook taste kitchen",
    "music": "guitar song drum melody concert band",
}


def write_texts(folder, per_class=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        {"text": " ".join(rng.choice(words.split(), 5)) + f" ref{label}{i}", "label": label}
        for label, words in TOPICS.items()
        for i in range(per_class)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "texts.csv", index=False)
    return folder


def text_cfg(**kw):
    return TextTableConfig(dataset="text", max_length=8, min_count=1, **kw)


def test_vocabulary_comes_from_train_and_serving_tokenises_the_same(tmp_path):
    data = write_texts(tmp_path / "data")
    manifest, _counts = describe_text(text_cfg(), data)
    texts, _labels, split = split_texts(data, manifest)
    train_words = {w for t, s in zip(texts, split, strict=True) if s == "train" for w in t.lower().split()}
    assert set(manifest["preprocessing"]["vocab"]) <= train_words
    only_in_test = {
        w for t, s in zip(texts, split, strict=True) if s == "test" for w in t.lower().split()
    } - train_words
    assert only_in_test and not only_in_test & set(manifest["preprocessing"]["vocab"])  # e.g. "refspace37": unseen
    splits = load_splits(data)
    assert splits.test[0].shape[1:] == (8,) and splits.test[0].dtype == np.float32
    served = encode_texts(manifest["preprocessing"], [t for t, s in zip(texts, split, strict=True) if s == "test"])
    np.testing.assert_array_equal(served, splits.test[0])
    assert encode_texts(manifest["preprocessing"], ["ROCKET, orbit!  zzz"])[0, :3].tolist()[2] == 1  # unknown word
    with pytest.raises(ValueError, match="text 1 is not a string"):
        encode_texts(manifest["preprocessing"], ["ok", 3])


TINY = {
    "data": {"dataset": "text", "max_length": 8, "min_count": 1},
    "search": {
        "n_trials": 2,
        "epochs": 8,
        "space": {
            "families": ["text", "cnn"],
            "lr": [0.01, 0.02],
            "optimizers": ["adam"],
            "depth": [1, 1],
            "width": [16, 32],
            "augment": ["none"],
        },
    },
    "train": {"max_epochs": 30, "patience": 8},
    "compress": {"candidates": {"int8": [{"method": "quantize_dynamic"}]}},
    "validate": {"warmup": 3, "latency_runs": 20, "throughput_runs": 3},
    "gates": {"min_accuracy": 0.8, "max_latency_ratio": None},
    "register": {"model_name": "tiny-topics"},
    "tracking": {"experiment": "e2e-text"},
}


@pytest.mark.e2e
def test_text_flow_ships_and_serves_texts(tmp_path, prefect_api):
    from flows.optimize import optimize

    write_texts(tmp_path / "data")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    optimize(config_path=str(tmp_path / "config.yaml"), root=str(tmp_path))
    bundle = tmp_path / "deploy" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["labels"] == sorted(TOPICS) and manifest["preprocessing"]["kind"] == "text"
    body, acc = serve_bundle(
        bundle,
        {"texts": ["The rocket, the orbit, a planet!", "cheese soup: cook, taste", "drum song, guitar band"]},
        ["space", "food", "music"],
    )
    assert acc == 1.0
    with running_server(create_app(BundleSource(bundle), ServeSettings(poll_seconds=60))) as (host, port):
        status, body = request(host, port, "POST", "/predict", {"texts": [42]})
        assert status == 400 and "text 0 is not a string" in body["error"]
