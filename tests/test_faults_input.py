"""Fault injection, second round (issue 25): bombs, giant configs, odd files and checkpoints. Every
test here failed on the code before its fix. Grouped by what the project guarantees (README,
"Reliability")."""

import base64
import json
import os
import re
import shutil
import struct
import time
import types
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import ImageFile
from test_data_image_folder import folder_cfg, write_images
from test_faults import post

from deploy.loadtest import running_server
from flows.cli import main
from serve.app import create_app
from serve.sources import BundleSource
from tasks.compress.distill import StudentSpec
from tasks.config import load_config, parse_config
from tasks.core.config_file import MAX_CONFIG_BYTES
from tasks.core.settings import ConfigError
from tasks.data import DataError, image_folder, load_splits
from tasks.data.image_folder import ImageFolderConfig, describe_image_folder
from tasks.data.table import TableDataConfig, describe_table
from tasks.data.version import version_data
from tasks.models import load_checkpoint
from tasks.models.custom import read_weights
from tasks.pipeline_run import pipeline_run
from tasks.release.ship import publish_copy

# --- Config: bounded before it is parsed, every section typed -----------------------------------------


def alias_bomb(levels: int, key: str = "student", indent: int = 8) -> str:
    """`key:` holding `levels` nested lists of ten aliases each: 10**levels copies of one small
    mapping, in under a kilobyte of YAML."""
    lines = ["x0: &a0 {family: cnn, depth: 2, width: 64, channels: 16}"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return f"{' ' * indent}{key}:\n" + "".join(f"{' ' * (indent + 2)}{line}\n" for line in lines)


def test_a_yaml_alias_bomb_is_refused_while_loading_with_a_short_message(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("compress:\n  candidates:\n    student:\n      - method: distill\n" + alias_bomb(6))
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert time.monotonic() - start < 1
    assert "with its YAML aliases (*name) written out, over the 256 KB limit" in str(err.value)
    assert len(str(err.value)) < 400, str(err.value)


@pytest.mark.parametrize(
    "student, message",
    [
        ({"family": "cnn", "depth": 2, "width": 64}, "a cnn student needs channels"),
        ({"family": "cnn", "depht": 2, "width": 64, "channels": 8}, r"student.depht: Extra inputs are not permitted"),
        ({"family": "mlp", "depth": 2, "width": 10**9}, r"student.width: Input should be less than or equal to 4096"),
    ],
)
def test_the_distillation_student_is_a_checked_section(student, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"compress": {"candidates": {"small": [{"method": "distill", "student": student}]}}})
    spec = {"family": "cnn", "depth": 2, "width": 64, "channels": 8}
    cfg = parse_config({"compress": {"candidates": {"small": [{"method": "distill", "student": spec}]}}})
    assert isinstance(cfg.compress.candidates["small"][0].student, StudentSpec)


def test_an_oversized_config_is_refused_before_it_is_parsed(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("big_list:\n" + "- 1\n" * (MAX_CONFIG_BYTES // 4))  # just over the limit
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"is over the 256 KB limit for a config file \(262,154 bytes or more"):
        load_config(config)
    assert time.monotonic() - start < 0.5


def test_unknown_keys_are_reported_by_line_and_their_values_never_built(tmp_path):
    config = tmp_path / "c.yaml"  # the unknown key holds an alias bomb: dropped unbuilt, it is not one
    config.write_text("search:\n  n_trails: 3\n  epochs: 0\n" + alias_bomb(9, "big_list", indent=0))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "(3 problem(s))" in str(err.value), str(err.value)
    assert "search.n_trails: unknown key (line 2)" in str(err.value) and "big_list: unknown key (line 4)" in str(
        err.value
    )
    assert "search.epochs: Input should be greater than or equal to 1" in str(err.value)


# --- Images: a pixel limit read from the header, in training and at the server ------------------------


def png_bomb(width: int, height: int) -> bytes:
    """A gray PNG of width x height black pixels, compressed row by row: a few KB that decode to
    width * height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(width + 1)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """The pixel count of every image Pillow decodes while the test runs."""
    seen, load = [], ImageFile.ImageFile.load

    def counted(self):
        if self.tile:  # still to decode (a loaded image has none)
            seen.append(self.size[0] * self.size[1])
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    return seen


def test_an_image_over_the_pixel_limit_is_refused_by_name_before_it_is_decoded(tmp_path, decodes):
    write_images(tmp_path / "d")
    (tmp_path / "d" / "dark" / "bomb.png").write_bytes(png_bomb(4096, 4096))  # 16.8 MP in 17 KB
    with pytest.raises(
        DataError,
        match=r"1 image\(s\) over the limit of 1,048,576 pixels \(data.max_image_pixels; "
        r"refused before decoding\): dark/bomb.png \(4096x4096",
    ):
        describe_image_folder(folder_cfg(), tmp_path / "d")  # 16x16: 64 x 256 px is under the 1 MP floor
    assert max(decodes) < 1000


def test_each_image_is_decoded_once_per_run(tmp_path, decodes):
    write_images(tmp_path / "d")
    describe_image_folder(folder_cfg(), tmp_path / "d")
    first, second = load_splits(tmp_path / "d"), load_splits(tmp_path / "d")  # as each stage of a run loads them
    assert len(decodes) == 36, len(decodes)
    image_folder._remember({})  # a fresh process decodes the same pixels
    assert np.array_equal(load_splits(tmp_path / "d").train[0], first.train[0])
    assert np.array_equal(second.train[0], first.train[0])


@pytest.fixture(scope="module")
def image_server(cnn_bundle, tmp_path_factory):
    """The digits CNN served as a model of 8x8 gray images, with preprocessing recorded before the
    pixel limits existed: the derived ones hold (1 MP an image, 16 MP a request)."""
    served = publish_copy(cnn_bundle, tmp_path_factory.mktemp("images") / "served")
    manifest = json.loads((served / "manifest.json").read_text())
    manifest["preprocessing"] = {
        "kind": "image",
        "size": [8, 8],
        "channels": 1,
        "color": "gray",
        "mean": [0.0],
        "std": [1.0],
    }
    (served / "manifest.json").write_text(json.dumps(manifest))
    with running_server(create_app(BundleSource(served))) as (host, port):
        yield host, port


@pytest.mark.parametrize(
    "images, status, message",
    [
        ([png_bomb(2048, 2048)], 400, "image 0: 2048x2048 = 4,194,304 pixels, over the limit of 1,048,576"),
        (
            [png_bomb(1000, 1000)] * 20,
            400,
            "the 20 images hold 20,000,000 pixels together, over the limit of 16,777,216 per request",
        ),
        ([png_bomb(64, 64)] * 4, 200, None),
    ],
)
def test_served_images_over_the_pixel_limits_are_a_400(image_server, images, status, message):
    body = json.dumps({"images": [base64.b64encode(image).decode() for image in images]}).encode()
    got_status, got = post(*image_server, body)
    assert got_status == status and (message is None or message in got["error"]), got


# --- Data folders: nothing DVC cannot version as written, nothing of the user's rewritten -------------


def test_a_file_name_that_is_not_utf8_is_one_data_error_naming_it_before_dvc_runs(tmp_path):
    write_images(tmp_path / "d")  # valid otherwise: `dvc add` used to be the first to trip on it
    with open(os.fsencode(tmp_path / "d" / "dark") + b"/caf\xe9.png", "wb") as f:
        f.write(png_bomb(8, 8))
    with pytest.raises(DataError, match=re.escape("b'dark/caf\\xe9.png': a file name that is not UTF-8")):
        version_data(ImageFolderConfig(dataset="image_folder", dir="d"), tmp_path)
    assert not (tmp_path / ".dvc").exists()


def test_a_link_leaving_the_data_folder_is_a_data_error_and_the_folder_is_left_as_it_was(tmp_path):
    write_images(tmp_path / "d")  # valid otherwise: it used to be versioned, the link replaced by a copy
    (tmp_path / "elsewhere.png").write_bytes(png_bomb(8, 8))
    (tmp_path / "d" / "dark" / "linked.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(DataError, match=r"dark/linked.png: a symbolic link leaving the data folder"):
        version_data(ImageFolderConfig(dataset="image_folder", dir="d"), tmp_path)
    assert (tmp_path / "d" / "dark" / "linked.png").is_symlink()


def test_a_parquet_list_column_is_a_data_error_naming_it_and_init_drops_it(tmp_path):
    (tmp_path / "d").mkdir()
    rng = np.random.default_rng(0)
    pd.DataFrame({"x": rng.normal(size=40), "tags": [[1, 2]] * 40, "label": ["a", "b"] * 20}).to_parquet(
        tmp_path / "d" / "t.parquet"
    )
    with pytest.raises(DataError, match=r"'tags' \(list<element: int64>\); list them in data.drop"):
        describe_table(TableDataConfig(dataset="table", label="label"), tmp_path / "d")
    assert main(["init", "--root", str(tmp_path), "--data", "d/t.parquet", "--label", "label", "--out", "c.yaml"]) == 0
    text = (tmp_path / "c.yaml").read_text()
    assert (
        "column 'tags' holds nested values (list<element: int64>): listed in data.drop" in text
        and "drop: [tags]" in text
    )
    manifest, _ = describe_table(load_config(tmp_path / "c.yaml").data, tmp_path / "d")
    assert list(manifest["schema"]) == ["x"]


def test_init_and_the_manifest_say_what_reading_a_table_decided(tmp_path):
    (tmp_path / "d").mkdir()
    amounts = [str(i) for i in range(57)] + ["12kg", "?", "abc"]  # a numeric column with three junk strings
    rows = [f"{i % 5},{i % 3},{amount},{'ab'[i % 2]}" for i, amount in enumerate(amounts)]
    (tmp_path / "d" / "t.csv").write_text("x,x,amount,label\n" + "\n".join(rows) + "\n")
    assert main(["init", "--root", str(tmp_path), "--data", "d/t.csv", "--label", "label", "--out", "c.yaml"]) == 0
    manifest, _ = describe_table(load_config(tmp_path / "c.yaml").data, tmp_path / "d")
    junk = "column 'amount' is read as categorical, yet 57 of its 60 values are numbers: 3 are not ('12kg', '?', 'abc')"
    repeat = "column 'x.1' is a repeat of the header name 'x' (pandas renamed it)"
    text = (tmp_path / "c.yaml").read_text()
    assert junk in text and repeat in text
    assert any(junk in note for note in manifest["notes"]) and any(repeat in note for note in manifest["notes"])


# --- Runs: what the next run cleans up, what a failing one prints ------------------------------------


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> dict:
    """One MLflow store for the runs below: creating a store's tables costs seconds."""
    return {"uri": f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db", "experiment": "faults-input"}


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, no cleanup either (rmtree is a no-op meanwhile)."""


def kill_during(monkeypatch, step: str) -> None:
    def killed(*args, **kwargs):
        if step == "copy":  # the model copied, the rest never
            shutil.copyfile(Path(args[0]) / "model.onnx", Path(args[1]) / "model.onnx")
        raise Killed

    fake = types.SimpleNamespace(
        copytree=killed if step == "copy" else shutil.copytree,
        rmtree=killed if step == "delete" else lambda *a, **k: None,
        copyfile=shutil.copyfile,
    )
    monkeypatch.setattr("tasks.release.ship.shutil", fake)


def test_the_next_run_removes_what_an_interrupted_ship_left_and_only_that(cnn_bundle, tracking, tmp_path, monkeypatch):
    deploy = tmp_path / "deploy"
    publish_copy(cnn_bundle, deploy / "bundle")
    for step in ("delete", "copy"):  # killed before deleting the old bundle; killed while copying the new one
        with monkeypatch.context() as patch:
            kill_during(patch, step)
            with pytest.raises(Killed):
                publish_copy(cnn_bundle, deploy / "bundle")
    left = sorted(p.name for p in deploy.iterdir() if p.name != "bundle")
    assert len(left) == 2 and any("-old-" in name for name in left), left
    (deploy / ".bundle-mine").mkdir()  # the user's own, named like a temporary folder
    (deploy / ".bundle-mine" / "notes.txt").write_text("mine")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"tracking": tracking}))
    with pipeline_run(config, tmp_path):
        pass
    assert sorted(p.name for p in deploy.iterdir()) == [".bundle-mine", "bundle"]
    assert (deploy / ".bundle-mine" / "notes.txt").read_text() == "mine"
    assert json.loads((deploy / "bundle" / "manifest.json").read_text())["format"] == "modelforge-bundle/1"


def test_a_data_error_prints_one_clean_line_and_no_traceback(prefect_api, tracking, tmp_path, capfd, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the session's API, not a server of its own
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "t.csv").write_text("a,label\n1,x\n")
    (tmp_path / "mydata" / "extra.npy").symlink_to(tmp_path / "c.yaml")  # refused before any DVC command
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"data": {"dataset": "table", "dir": "mydata", "label": "label"}, "tracking": tracking})
    )
    assert main(["run", "--config", str(config), "--root", str(tmp_path)]) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-3000:]
    assert (out + err).count("extra.npy") == 1 and "modelforge: DataError: " in err, (out + err)[-3000:]


# --- Checkpoints: refused without advice to unpickle ------------------------------------------------


@pytest.mark.parametrize("loader", [load_checkpoint, read_weights])
def test_a_pickled_model_is_refused_without_suggesting_the_unsafe_loader(tmp_path, loader):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")  # a whole pickled module, not tensors
    with pytest.raises(ValueError) as err:
        loader(tmp_path / "model.pt")
    assert "weights_only" not in str(err.value) and "add_safe_globals" not in str(err.value), str(err.value)
    assert "torch.nn.modules.linear.Linear" in str(err.value) and "never unpickles" in str(err.value)
