"""A run's fingerprint and the training cache key change with every input of the outcome: the
pipeline's code at any depth, the user's model module and the project modules it imports, and
checkpoint files or folders replaced in place (a stale model was once kept after each of these)."""

import shutil
from pathlib import Path

import pytest

from tasks.config import PipelineConfig
from tasks.core import fingerprint as fp
from tasks.pipeline_run import fingerprint
from tasks.train.stage import TrainConfig, train_cache_key

USER_MODULE = Path(__file__).with_name("user_models.py")


def test_code_version_covers_sub_packages(tmp_path, monkeypatch):
    for rel in ("tasks/a.py", "tasks/models/b.py", "tasks/data/deep/c.py", "flows/f.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    monkeypatch.setattr(fp, "PACKAGE_ROOT", tmp_path)
    versions = []
    for rel in ("tasks/models/b.py", "tasks/data/deep/c.py"):
        fp.code_version.cache_clear()
        before = fp.code_version()
        (tmp_path / rel).write_text("x = 2\n")
        fp.code_version.cache_clear()
        versions.append((before, fp.code_version()))
    fp.code_version.cache_clear()
    assert all(before != after for before, after in versions)


def _project(tmp_path: Path) -> Path:
    """A user's project: their model module importing a helper module of their own."""
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "__init__.py").write_text("")
    (tmp_path / "acme" / "layers.py").write_text("WIDTH = 32\n")
    (tmp_path / "acme" / "nets.py").write_text(
        "import torch\nfrom torch import nn\nfrom .layers import WIDTH\n\n"
        "def build(num_classes, input_shape):\n    return nn.Linear(WIDTH, num_classes)\n"
    )
    (tmp_path / "w.pt").write_bytes(b"weights v1")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"checkpoint v1")
    return tmp_path


def test_user_code_files_follow_project_imports_only(tmp_path):
    root = _project(tmp_path)
    files = fp.user_code_files("acme.nets", root)
    assert files == sorted([root / "acme" / "nets.py", root / "acme" / "layers.py"])  # torch is not theirs
    shutil.copy(USER_MODULE, root / "mynet.py")
    assert fp.user_code_files("mynet", root) == [root / "mynet.py"]


@pytest.mark.parametrize("edit", ["module", "imported module", "weights", "pretrained folder", "init_from"])
def test_fingerprint_and_train_key_change_when_user_files_change(tmp_path, monkeypatch, edit):
    root = _project(tmp_path)
    monkeypatch.syspath_prepend(str(root))  # as the run's pre-training check does, for every stage
    (root / "init.pt").write_bytes(b"init v1")
    cfg = PipelineConfig.model_validate(
        {
            "model": {"spec": "acme.nets:build", "weights": "w.pt"},
            "train": {"init_from": "init.pt"},
            "compress": {"candidates": {"int8": [{"method": "quantize_dynamic"}]}},
        }
    ).anchored(root)
    hf_cfg = PipelineConfig.model_validate(
        {"data": {"dataset": "image_folder", "dir": "data"}, "model": {"pretrained": "hf"}}
    ).anchored(root)
    train = TrainConfig(init_from=root / "init.pt")
    best = {
        "family": "custom",
        "spec": "acme.nets:build",
        "weights": str(root / "w.pt"),
        "pretrained": str(root / "hf"),
    }

    def state():
        return fingerprint(cfg, "md5", root), fingerprint(hf_cfg, "md5", root), train_cache_key(train, best, "md5")

    before = state()
    path, text = {
        "module": ("acme/nets.py", "WIDTH = 48\n"),
        "imported module": ("acme/layers.py", "WIDTH = 48\n"),
        "weights": ("w.pt", "weights v2"),
        "pretrained folder": ("hf/model.safetensors", "checkpoint v2"),
        "init_from": ("init.pt", "init v2"),
    }[edit]
    with open(root / path, "a") as f:
        f.write(text)
    after = state()
    assert before[0]["code_version"] == after[0]["code_version"]  # the pipeline's code did not change
    changed = {"pretrained folder": [1, 2]}.get(edit, [0, 2])
    for i in changed:
        assert before[i] != after[i], (
            f"{edit} edited in place, yet {['fingerprint', 'hf fingerprint', 'train key'][i]} is unchanged"
        )


def test_a_users_module_is_imported_as_it_is_now(tmp_path, monkeypatch):
    """One process runs several projects (a worker, this test session): a module of the same name from
    another project, or one edited since it was imported, must not be the code that runs."""
    from tasks.models.custom import load_factory

    first, second = tmp_path / "one", tmp_path / "two"
    for folder, width in ((first, 3), (second, 5)):
        (folder / "zoo").mkdir(parents=True)
        (folder / "zoo" / "__init__.py").write_text("")
        (folder / "zoo" / "sizes.py").write_text(f"WIDTH = {width}\n")
        (folder / "zoo" / "nets.py").write_text(
            "from torch import nn\nfrom .sizes import WIDTH\n\n"
            "def build(num_classes, input_shape):\n"
            "    return nn.Linear(WIDTH, num_classes)\n"
        )
    width = lambda: load_factory("zoo.nets:build")(2, (1,)).in_features
    monkeypatch.syspath_prepend(str(first))
    assert width() == 3
    monkeypatch.syspath_prepend(str(second))  # the next project, same module names
    assert width() == 5
    (second / "zoo" / "sizes.py").write_text("WIDTH = 7\n")  # an imported module edited in place
    assert width() == 7
    monkeypatch.undo()  # neither project on sys.path any more: the module is not importable, whatever was cached
    with pytest.raises(ValueError, match=r"cannot import 'zoo\.nets'"):
        load_factory("zoo.nets:build")
