"""What every pipeline's config shares: where it writes, how candidates are judged, registered, promoted
and tracked; anchoring relative paths at the project and refusing unsafe ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.settings import ConfigError, Section
from tasks.core.tracking import TrackingConfig
from tasks.release.promote import PromoteConfig
from tasks.release.register import RegisterConfig
from tasks.release.validate import GateConfig, ValidateConfig


class DataSection(Protocol):
    """What every family's data section has (each pipeline declares its own `data`)."""

    @property
    def dir(self) -> Path: ...

    @property
    def dvc_remote(self) -> str: ...


class PipelineBase(Section):
    """What every pipeline shares: where it writes, how candidates are judged, registered,
    promoted and tracked."""

    if TYPE_CHECKING:  # a field of each pipeline, of its family's own section type
        data: DataSection

    workdir: Path = Field(Path(".modelforge"), description="Everything a run writes (checkpoints, ONNX, studies).")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    gates: GateConfig = Field(default_factory=GateConfig)
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def anchored(self, root: Path):
        """The same config with every relative path (top level or one section down) anchored at
        `root` (the project folder), the SQLite tracking URI included."""
        root = Path(root).resolve()
        at = lambda p: root / p if isinstance(p, Path) and not p.is_absolute() else p
        update: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                update[name] = value.model_copy(update={k: at(getattr(value, k)) for k in type(value).model_fields})
            else:
                update[name] = at(value)
        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
        update["tracking"] = update["tracking"].model_copy(update={"uri": uri})
        remote = self.data.dvc_remote
        if "://" not in remote and not Path(remote).is_absolute():
            update["data"] = update["data"].model_copy(update={"dvc_remote": str(root / remote)})
        return self.model_copy(update=update)

    def resolved(self, root: Path):
        """`anchored` at `root`, and refused with one `ConfigError` when a folder it writes is unsafe."""
        root = Path(root).resolve()
        resolved = self.anchored(root)
        if problems := resolved.path_problems(root):
            raise ConfigError(
                f"unsafe paths in the config ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems)
            )
        return resolved

    def path_problems(self, root: Path) -> list[str]:
        """Folders a run writes, replaces or versions must lie strictly inside the project; a bundle
        folder (replaced whole on every ship) must not hold the project's other folders or each
        other, and if it exists it must be a bundle modelforge wrote."""
        from tasks.release.guard import bundle_problem

        written = {
            "workdir": self.workdir,
            "data.dir": self.data.dir,
            "register.bundle_dir": self.register_.bundle_dir,
            "promote.champion_bundle_dir": self.promote.champion_bundle_dir,
        }
        where = {name: Path(path).resolve() for name, path in written.items()}
        problems = [
            f"{name}: {path} is {'the project folder itself' if path == root else 'outside the project'} "
            f"({root}); use a folder inside it"
            for name, path in where.items()
            if path == root or not path.is_relative_to(root)
        ]
        for bundle in ("register.bundle_dir", "promote.champion_bundle_dir"):
            problems += [
                f"{bundle}: {where[bundle]} would contain {other} ({where[other]}), which a ship "
                "replaces with the bundle"
                for other in where
                if other != bundle and where[other].is_relative_to(where[bundle])
            ]
            if where[bundle].is_relative_to(root) and where[bundle] != root and (why := bundle_problem(where[bundle])):
                problems.append(f"{bundle}: {why}; a ship would replace it")
        return problems

    def user_inputs(self) -> tuple[str | None, list[Path]]:
        """The user's model module (a spec) and the checkpoint files or folders the config names:
        their contents are inputs of the run as much as the config's text."""
        return None, []

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections, used in cache keys: same config, same key."""
        payload = {s: self.model_dump(mode="json", by_alias=True)[s] for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, str]:
        """Dotted key -> value, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

        walk("", self.model_dump(mode="json", by_alias=True))
        return out
