"""`modelforge` command line."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


def _embedded_defaults(root: Path) -> None:
    """Project-local state for every tool, set before prefect/mlflow/dvc are imported."""
    state = root / ".modelforge"
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # prefect makes only the last level
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server migrates a fresh SQLite database on first start: 20 s is tight on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the optimize flow end to end")
    run.add_argument("--config", default="configs/digits.yaml", help="pipeline config (YAML)")
    run.add_argument("--root", default=".", help="project folder: DVC repo, relative paths anchor here")
    args = parser.parse_args(argv)

    # torch's exporter trips a deprecation inside its own pytree code on every export.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    root = Path(args.root).resolve()
    _embedded_defaults(root)
    from flows.optimize import optimize
    from tasks.config import ConfigError
    from tasks.validate_model import GateError
    from tasks.version_data import DataError

    try:
        result = optimize(config_path=args.config, root=str(root))
    except (ConfigError, DataError, GateError, ValueError) as err:
        print(f"modelforge: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(f"modelforge: shipped {result['chosen']} -> {result['bundle']} ({result['model_uri']} v{result['version']}); "
          f"{'promoted to champion' if result['promoted'] else 'champion kept'}: {result['promotion_reason']}")
    return 0


def _rollback(config: str, root: Path) -> int:
    from tasks.config import ConfigError, load_config
    from tasks.promote_model import rollback
    from tasks.track_run import setup_tracking

    try:
        cfg = load_config(config).resolved(root)
        setup_tracking(cfg.tracking)
        rollback(cfg.register_.model_name, cfg.promote)
    except (ConfigError, ValueError) as err:
        print(f"modelforge: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
