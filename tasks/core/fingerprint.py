"""What a run's outcome depends on beside its data and config: code and model files.

`code_version` hashes the pipeline's own source; `inputs_version` hashes what the config names from
the user's side: their model module (and the project modules it imports), weights, a fine-tuning
checkpoint and a pretrained folder. Both go into the run's fingerprint ("nothing new" skips) and the
training cache key, so an edit to any of them retrains instead of serving a stale model.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import sys
from collections.abc import Iterable
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _digest_files(h: hashlib._Hash, files: Iterable[Path], base: Path) -> None:
    for path in sorted(files):
        # The name goes in too: a module moved to another package is another program.
        h.update(str(path.relative_to(base)).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())


@functools.cache
def code_version() -> str:
    """Hash of the pipeline's own source, every `.py` under tasks/ and flows/ at any depth: a code
    change invalidates cached work.

    Taken once per process: the code that runs is the code imported at the start, and a file edited
    mid-run must not change cache keys between two stages of the same run (it once made
    student_int8 retrain the student that student had just cached)."""
    h = hashlib.sha256()
    _digest_files(h, [p for d in ("tasks", "flows") for p in (PACKAGE_ROOT / d).rglob("*.py")], PACKAGE_ROOT)
    return h.hexdigest()[:16]


def path_digest(path: Path) -> str:
    """Content hash of a file, or of every file in a folder (names included); 'missing' when absent,
    which the pre-training checks then report."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        _digest_files(h, [path], path.parent)
    elif path.is_dir():
        _digest_files(h, [p for p in path.rglob("*") if p.is_file()], path)
    else:
        return "missing"
    return h.hexdigest()[:16]


def _module_file(name: str, search: list[Path]) -> Path | None:
    """The source file of module `name` under one of the `search` folders, else on `sys.path` (looked
    up as files, not through `sys.modules`: another project's module of the same name may be
    imported in this process); None when it cannot be found (the pre-training check reports a spec
    that does not import)."""
    parts = name.split(".")
    for folder in [*search, *(Path(p or ".") for p in sys.path)]:
        for candidate in (folder.joinpath(*parts).with_suffix(".py"), folder.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Module names a source file imports, relative imports resolved against `module`."""
    names: set[str] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return names
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            if stem:
                names.add(stem)
            # `from pkg import mod` may name a module as well as an attribute
            names.update(f"{stem}.{alias.name}" if stem else alias.name for alias in node.names)
    return names


def user_code_files(module: str, root: Path | None = None) -> list[Path]:
    """The file of a user's `module` (looked up in `root` first, then on `sys.path`) and, transitively,
    every module it imports that lives in the same source tree (the project folder, or the same
    installed top-level package): what a change to their model's code touches."""
    return sorted(set(user_modules(module, root).values()))


def user_modules(module: str, root: Path | None = None) -> dict[str, Path]:
    """`user_code_files` by module name."""
    first = _module_file(module, [Path(root).resolve()] if root else [])
    if first is None:
        return {}
    # The folder the module's dotted name starts from: only modules under it are the user's own.
    tree = first.parents[module.count(".") + (first.name == "__init__.py")]
    installed = {"site-packages", "dist-packages"} & set(tree.parts)
    own = tree / module.split(".")[0] if installed else tree
    seen: dict[str, Path] = {}
    queue = [module]
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        path = _module_file(name, [tree])
        # A virtual environment inside the project holds installed libraries, not the user's code.
        if (
            path is None
            or not path.is_relative_to(own)
            or {"site-packages", "dist-packages"} & set(path.relative_to(own).parts)
        ):
            continue
        seen[name] = path
        queue += sorted(_imported_names(path.read_text(errors="replace"), name, path.name == "__init__.py"))
    return seen


_IMPORTED: dict[str, str] = {}  # module name -> digest of the file it was imported from


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def import_current(module: str) -> object:
    """`importlib.import_module` for a user's module, as its files are now: when it, a package above it
    or a project module it imports was imported earlier from another file (another project's module
    of the same name) or from source edited since, they are imported again. A long-lived process (a
    Prefect worker, a test session) then runs the code the run's fingerprint hashed."""
    parts = module.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    files = {name: path for name in chain if (path := _module_file(name, [])) is not None} | user_modules(module)
    installed = lambda p: bool({"site-packages", "dist-packages"} & set(p.parts))
    stale = [
        name
        for name, path in files.items()
        if name in sys.modules
        and not installed(path)
        and (
            Path(getattr(sys.modules[name], "__file__", None) or "/").resolve() != path
            or _IMPORTED.get(name) != _file_digest(path)
        )
    ]
    gone = [name for name in chain if name in sys.modules and name not in files]  # its folder left sys.path
    if stale or gone:
        for name in [*files, *gone]:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
    imported = importlib.import_module(module)
    _IMPORTED.update({name: _file_digest(path) for name, path in files.items() if name in sys.modules})
    return imported


def inputs_version(spec: str | None = None, files: Iterable[Path | str | None] = (), root: Path | None = None) -> str:
    """Hash of the user's model code (`spec`'s module and the project modules it imports) and of the
    checkpoint files or folders in `files`; empty when the config names none."""
    parts = []
    if spec:
        code = user_code_files(spec.partition(":")[0], root)
        h = hashlib.sha256()
        if code:
            _digest_files(h, code, Path("/"))
        parts.append(f"{spec}={h.hexdigest()[:16] if code else 'unresolved'}")
    parts += [f"{Path(f).name}={path_digest(Path(f))}" for f in files if f]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else ""
