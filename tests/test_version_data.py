import json
import shutil

import numpy as np
import pytest

from tasks.data import DataError, load_splits
from tasks.data.digits import DataConfig, materialize_digits
from tasks.data.docstrings import TextDataConfig, load_sentences, materialize_docstrings
from tasks.data.version import read_data_md5, version_data


def test_digits_split_is_stratified_and_complete(splits):
    total = sum(len(getattr(splits, s)[1]) for s in ("train", "val", "test"))
    assert total == 1797
    assert set(np.unique(splits.test[1])) == set(range(10))
    assert splits.train[0].shape[1:] == (1, 8, 8) and splits.train[0].max() <= 1.0


def test_materialize_is_byte_deterministic(tmp_path):
    materialize_digits(DataConfig(), tmp_path / "a")
    materialize_digits(DataConfig(), tmp_path / "b")
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_bad_data_lists_every_problem(data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    x = np.load(bad / "train_x.npy")
    x[0, 0, 0, 0] = np.nan
    np.save(bad / "train_x.npy", x)
    y = np.load(bad / "val_y.npy")
    y[0] = 12
    np.save(bad / "val_y.npy", y)
    np.save(bad / "test_x.npy", np.zeros((5, 1, 4, 4), np.float32))
    with pytest.raises(DataError) as err:
        load_splits(bad)
    msg = str(err.value)
    assert "train_x: 1 NaN/inf" in msg
    assert "val_y: labels outside [0, 10)" in msg
    assert "test_x: sample shape (1, 4, 4)" in msg and "test: 5 samples but 360 labels" in msg


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(DataError, match="manifest"):
        load_splits(tmp_path)


def test_version_data_with_real_dvc(tmp_path):
    cfg = DataConfig()
    v1 = version_data(cfg, tmp_path)
    assert v1.md5.endswith(".dir") and v1.md5 == read_data_md5(tmp_path / "data.dvc")
    assert any((tmp_path / ".modelforge" / "dvc-remote").rglob("*")), "nothing pushed to the local remote"
    # Data gone from the workspace: it comes back from the DVC remote with the same version.
    shutil.rmtree(tmp_path / "data")
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    v2 = version_data(cfg, tmp_path)
    assert v2.md5 == v1.md5
    # A changed file is a new data version.
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({**manifest, "note": "relabelled"}))
    assert version_data(cfg, tmp_path).md5 != v1.md5


def test_bad_data_is_never_versioned(tmp_path):
    cfg = DataConfig()
    materialize_digits(cfg, tmp_path / "data")
    np.save(tmp_path / "data" / "train_y.npy", np.full(3, -1))
    with pytest.raises(DataError):
        version_data(cfg, tmp_path)
    assert not (tmp_path / "data.dvc").exists()


def test_a_file_the_data_set_does_not_read_is_refused_not_versioned(tmp_path):
    cfg = DataConfig()
    v1 = version_data(cfg, tmp_path)
    np.save(tmp_path / "data" / "new_batch_x.npy", np.zeros((5, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"1 file.* this data set does not read: new_batch_x\.npy"):
        version_data(cfg, tmp_path)
    assert read_data_md5(tmp_path / "data.dvc") == v1.md5  # no new version for data nothing would read


def test_sentence_corpus_is_disjoint_and_validated(tmp_path):
    cfg = TextDataConfig(train_sentences=40, eval_sentences=30, queries=10)
    materialize_docstrings(cfg, tmp_path / "a")
    materialize_docstrings(cfg, tmp_path / "b")
    assert (tmp_path / "a" / "eval.txt").read_bytes() == (tmp_path / "b" / "eval.txt").read_bytes()
    corpus = load_sentences(tmp_path / "a")
    assert len(corpus.train) == 40 and len(corpus.eval) == 30 and corpus.queries == 10
    assert not set(corpus.train) & set(corpus.eval)
    train = tmp_path / "a" / "train.txt"
    train.write_text(train.read_text() + "\n" + corpus.eval[0] + "\n")  # a blank line and a leaked eval sentence
    with pytest.raises(DataError) as err:
        load_sentences(tmp_path / "a")
    assert "1 blank line" in str(err.value) and "1 sentence(s) are in both" in str(err.value)


def test_corpus_built_with_other_settings_is_refused(tmp_path):
    cfg = TextDataConfig(
        dir="corpus", train_sentences=20, eval_sentences=15, queries=5, dvc_remote=str(tmp_path / "remote")
    )
    assert version_data(cfg, tmp_path).manifest["counts"] == {"train": 20, "eval": 15}
    with pytest.raises(
        DataError, match=r"other settings .* counts: \{'eval': 15, 'train': 20\} vs \{'train': 30, 'eval': 15\}"
    ):
        version_data(cfg.model_copy(update={"train_sentences": 30}), tmp_path)
