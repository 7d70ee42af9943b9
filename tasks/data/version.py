"""Materialize, validate and version the data set with DVC.

The DVC `.dir` md5 of the data folder is the one data-version key: MLflow tags, Prefect cache keys
and the serving manifest all carry it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import task

from tasks.data import SOURCES, ClassifierData
from tasks.data.base import DataError, folder_problems, raise_problems
from tasks.data.corpus import CorpusConfig
from tasks.data.docstrings import TextDataConfig


@dataclass(frozen=True)
class DataVersion:
    md5: str  # DVC .dir md5 of the data folder
    dir: Path
    manifest: dict  # the folder's manifest.json
    remote: str  # the DVC remote holding this version (a folder or a URL)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:  # per sample, without the batch axis
        return tuple(self.manifest["input_shape"])


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {root}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def read_data_md5(dvc_file: Path) -> str:
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return outs[0]["md5"]


def version_data(cfg: ClassifierData | TextDataConfig | CorpusConfig, root: Path) -> DataVersion:
    """Ensure `cfg.dir` holds valid data tracked by DVC and pushed to the local remote.

    Missing data is pulled from the remote when `data.dvc` names a version there, otherwise written
    from the built-in data set (a user's source has none: its folder must exist). Validation runs
    before `dvc add`, so bad data is never versioned.
    """
    root = Path(root).resolve()
    data_dir = root / cfg.dir
    if data_dir.is_dir():  # before any DVC command: `dvc add` would rewrite links and die on odd names
        raise_problems(data_dir, folder_problems(data_dir))
    dvc_file = data_dir.with_name(data_dir.name + ".dvc")
    remote = cfg.dvc_remote if "://" in cfg.dvc_remote else str((root / cfg.dvc_remote).resolve())
    if not (root / ".dvc").is_dir():
        _dvc(root, "init", *(() if (root / ".git").exists() else ("--no-scm",)))
    _dvc(root, "config", "--local", "core.analytics", "false")
    # --local keeps the machine-specific absolute path out of the committed .dvc/config.
    _dvc(root, "remote", "add", "--local", "--default", "--force", "modelforge", remote)
    if not data_dir.exists() and dvc_file.exists():
        try:
            _dvc(root, "pull", str(dvc_file))
        except RuntimeError as err:
            print(f"[version_data] data not in the remote, rebuilding it ({str(err).splitlines()[0]})")
    source = SOURCES[cfg.dataset]
    if not data_dir.exists():
        if source.materialize is None:
            raise DataError(f"{data_dir} does not exist: put the {cfg.dataset} data there (or fix data.dir)")
        source.materialize(cfg, data_dir)
    manifest, counts = source.describe(cfg, data_dir)
    _dvc(root, "add", str(data_dir.relative_to(root)))
    if "://" not in remote:
        Path(remote).mkdir(parents=True, exist_ok=True)
    _dvc(root, "push", str(dvc_file))
    md5 = read_data_md5(dvc_file)
    print(f"[version_data] {data_dir.relative_to(root)} version {md5} {counts}")
    for note in manifest.get("notes", []):
        print(f"[version_data] note: {note}")
    return DataVersion(md5, data_dir, manifest, remote)


version_data_task = task(name="version_data")(version_data)
