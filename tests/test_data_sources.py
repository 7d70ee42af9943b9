"""One contract every classifier data source passes (as test_family_contract does for model families):
every problem is reported at once, files it does not read are refused, serving encodes a raw sample
exactly as training did, appending samples moves no old one to another split, and a search on the
grown data warm-starts from the study on the old one. A new source gets a `CASES` entry."""

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_data_image_folder import write_images
from test_data_text import write_texts

from tasks.data import SOURCES, DataError, load_splits
from tasks.data.base import read_manifest
from tasks.data.image_folder import ImageFolderConfig, encode_images
from tasks.data.table import TableDataConfig, encode_records, split_rows
from tasks.data.text import TextTableConfig, encode_texts, split_texts
from tasks.examples import wine
from tasks.search.space import SearchConfig
from tasks.search.trials import prepare_study, run_trials


@dataclass(frozen=True)
class Case:
    config: Callable[..., object]  # the source's config, with test-sized settings
    write: Callable[[Path, int], None]  # a valid data set (seeded); a second seed gives other samples
    append: Callable[[Path, Path], None]  # add the samples of a second data set to the first
    problems: Callable[[Path], tuple[dict, list[str]]]  # spoil a valid set: (config settings, expected problems)
    served: Callable[[Path, dict], tuple[np.ndarray, np.ndarray]]  # (raw test samples served, training's test x)
    samples: Callable[[Path, dict], dict[str, str]]  # sample identity -> split
    family: str  # the model family a search on it uses


# --- table ------------------------------------------------------------------------------------------


def table_problems(data: Path) -> tuple[dict, list[str]]:
    frame = pd.read_csv(data / "data.csv")
    frame.loc[:2, "label"] = None
    frame.to_csv(data / "data.csv", index=False)
    return {"min_class_samples": 200}, ["3 row(s) without a label", "fewer than 200 train rows"]


def table_append(data: Path, more: Path) -> None:
    old, new = pd.read_csv(data / "data.csv"), pd.read_csv(more / "data.csv")
    pd.concat([old, new]).to_csv(data / "data.csv", index=False)


def table_served(data: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    rows, split = split_rows(data, manifest)
    records = json.loads(rows[split == "test"].drop(columns="label").to_json(orient="records"))  # as a client sends
    return encode_records(manifest["preprocessing"], records), load_splits(data).test[0]


def table_samples(data: Path, manifest: dict) -> dict[str, str]:
    rows, split = split_rows(data, manifest)
    return dict(
        zip((json.dumps(r, sort_keys=True) for r in json.loads(rows.to_json(orient="records"))), split, strict=True)
    )


def wine_part(data: Path, seed: int) -> None:
    """Half of the wine table: the even rows, or with seed 1 the odd ones (arriving later)."""
    wine(data)
    frame = pd.read_csv(data / "data.csv")
    frame.iloc[seed % 2 :: 2].to_csv(data / "data.csv", index=False)


# --- image folder -----------------------------------------------------------------------------------


def image_problems(data: Path) -> tuple[dict, list[str]]:
    (data / "dark" / "broken.png").write_bytes(b"not a png")
    shutil.copy(data / "dark" / "0.png", data / "mid" / "copy.png")
    return {"min_class_samples": 50}, ["dark/broken.png", "under several classes", "fewer than 50 train images"]


def image_append(data: Path, more: Path) -> None:
    for folder in more.iterdir():
        for f in folder.iterdir():
            shutil.copy(f, data / folder.name / f"new-{f.name}")


def image_served(data: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    test = sorted(n for n, i in manifest["files"].items() if i["split"] == "test")
    served = encode_images(manifest["preprocessing"], [(data / n).read_bytes() for n in test])
    return served, load_splits(data).test[0]


# --- text -------------------------------------------------------------------------------------------


def text_problems(data: Path) -> tuple[dict, list[str]]:
    frame = pd.read_csv(data / "texts.csv")
    frame.loc[0, "text"], frame.loc[1, "label"], frame.loc[2, "text"] = None, None, "!!!"
    frame.loc[3, "text"], frame.loc[3, "label"] = (
        frame.loc[4, "text"],
        "food" if frame.loc[4, "label"] != "food" else "music",
    )
    frame.to_csv(data / "texts.csv", index=False)
    return {"min_class_samples": 100}, [
        "column 'text': 1 empty value",
        "column 'label': 1 empty value",
        "without a single word",
        "appear with different labels",
        "fewer than 100 train rows",
    ]


def text_append(data: Path, more: Path) -> None:
    old, new = pd.read_csv(data / "texts.csv"), pd.read_csv(more / "texts.csv")
    new["text"] = "later " + new["text"]  # other texts, as a later delivery brings
    pd.concat([old, new]).to_csv(data / "texts.csv", index=False)


def text_served(data: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    texts, _, split = split_texts(data, manifest)
    return encode_texts(
        manifest["preprocessing"], [t for t, s in zip(texts, split, strict=True) if s == "test"]
    ), load_splits(data).test[0]


def text_samples(data: Path, manifest: dict) -> dict[str, str]:
    texts, _, split = split_texts(data, manifest)
    return dict(zip(texts, split, strict=True))


CASES = {
    "table": Case(
        lambda **kw: TableDataConfig(dataset="table", label="label", **kw),
        wine_part,
        table_append,
        table_problems,
        table_served,
        table_samples,
        "mlp",
    ),
    "image_folder": Case(
        lambda **kw: ImageFolderConfig(dataset="image_folder", image_size=(16, 16), **kw),
        lambda data, seed: write_images(data, seed=seed),
        image_append,
        image_problems,
        image_served,
        lambda data, manifest: {n: i["split"] for n, i in manifest["files"].items()},
        "mlp",
    ),
    "text": Case(
        lambda **kw: TextTableConfig(dataset="text", max_length=8, min_count=1, **kw),
        lambda data, seed: write_texts(data, per_class=20, seed=seed),
        text_append,
        text_problems,
        text_served,
        text_samples,
        "text",
    ),
}


def describe(name: str, data: Path, **settings) -> dict:
    return SOURCES[name].describe(CASES[name].config(**settings), data)[0]


def test_every_classifier_source_is_covered():
    assert set(CASES) == {k for k, s in SOURCES.items() if s.load and not s.materialize}  # digits is built in


@pytest.fixture(params=sorted(CASES))
def source(request, tmp_path) -> tuple[str, Case, Path]:
    case = CASES[request.param]
    case.write(tmp_path / "data", 0)
    return request.param, case, tmp_path / "data"


def test_every_problem_and_every_stray_file_are_reported_at_once(source):
    name, case, data = source
    settings, expected = case.problems(data)
    (data / "notes.txt").write_text("not data")
    with pytest.raises(DataError) as err:
        describe(name, data, **settings)
    text = str(err.value)
    for problem in [*expected, "notes.txt"]:
        assert problem in text, text


def test_a_stray_file_alone_is_refused(source):
    name, _, data = source
    (data / "stray.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"stray\.npy"):
        describe(name, data)


def test_serving_encodes_a_raw_sample_exactly_as_training_did(source):
    name, case, data = source
    served, trained = case.served(data, describe(name, data))
    assert len(served) == len(trained) > 0
    np.testing.assert_allclose(served, trained, atol=1e-6)


def test_appending_moves_no_old_sample_and_the_search_warm_starts(source, tmp_path):
    name, case, data = source
    before = case.samples(data, describe(name, data))
    space = {
        "families": [case.family],
        "optimizers": ["adam"],
        "depth": [1, 1],
        "width": [16, 16],
        "batch_sizes": [32],
        "augment": ["none"],
    }
    cfg = SearchConfig(n_trials=1, epochs=1, warm_start=1, space=space)

    def study(manifest: dict) -> str:  # experiment-datamd5-searchhash, as the pipeline names it
        return f"contract-{hashlib.md5(json.dumps(manifest['counts']).encode()).hexdigest()}-search"

    run_trials(cfg, data, tmp_path / "search", study(read_manifest(data)))
    case.write(tmp_path / "more", 1)
    case.append(data, tmp_path / "more")
    after = case.samples(data, describe(name, data))
    assert len(after) > len(before)
    assert {k: after[k] for k in before} == before  # every old sample in the split it had
    assert "test" in {after[k] for k in after.keys() - before.keys()}  # new samples reach test too
    grown = study(read_manifest(data))
    assert prepare_study(cfg, tmp_path / "search", grown) == 1  # the old study's best trial queued first
    assert run_trials(cfg, data, tmp_path / "search", grown) == 1  # and it trains on the grown data
