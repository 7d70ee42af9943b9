"""A worker gets a data version by its DVC md5 from the remote, verified, never another folder's bytes."""

import json
from pathlib import Path

import pytest

from tasks.data import DataError, load_splits
from tasks.data.digits import DataConfig
from tasks.data.version import version_data
from tasks.search.fetch import DataRef, fetch_data


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    remote = tmp_path_factory.mktemp("remote")
    return version_data(DataConfig(dvc_remote=str(remote)), root)


def test_a_version_is_fetched_by_md5_into_the_worker_cache(pushed, tmp_path):
    folder = fetch_data(DataRef(pushed.md5, pushed.remote, str(tmp_path / "cache")))
    assert folder.parent == tmp_path / "cache" and folder != pushed.dir
    fetched, original = load_splits(folder), load_splits(pushed.dir)
    assert (fetched.train[0] == original.train[0]).all() and fetched.manifest == original.manifest
    assert fetch_data(DataRef(pushed.md5, "/nonexistent", str(tmp_path / "cache"))) == folder  # cached: no remote read


def test_a_version_missing_from_the_remote_is_a_data_error(pushed, tmp_path):
    with pytest.raises(DataError, match="not in the DVC remote"):
        fetch_data(DataRef("0" * 32 + ".dir", pushed.remote, str(tmp_path)))


def test_a_corrupt_remote_object_is_refused_and_nothing_is_cached(pushed, tmp_path):
    remote = tmp_path / "remote"
    import shutil

    shutil.copytree(pushed.remote, remote)
    dir_obj = remote / "files" / "md5" / pushed.md5[:2] / pushed.md5[2:]
    entry = json.loads(dir_obj.read_text())[0]
    (remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]).write_bytes(b"not the data")
    with pytest.raises(DataError, match=f"{entry['relpath']} in the remote has md5"):
        fetch_data(DataRef(pushed.md5, str(remote), str(tmp_path / "cache")))
    assert not any(p.is_dir() for p in Path(tmp_path / "cache").iterdir())
