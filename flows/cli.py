"""modelforge: dataset + model family -> compressed, validated, shipped ONNX model."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path


def embedded_defaults(root: Path) -> None:
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
    # torch's exporter trips a deprecation inside its own pytree code on every export.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


# The errors the `modelforge:` line fully explains, by the module that defines each. A command raises
# only those of modules it imported: `serve` and `ui` need not import torch, Optuna and Prefect to
# catch them (seconds at every start of a server).
EXPLAINED = {
    "ConfigError": "tasks.core.settings",
    "DataError": "tasks.data.base",
    "GateError": "tasks.release.validate",
    "SearchError": "tasks.search.summary",
    "WorkdirBusy": "tasks.core.lock",
    "BundleError": "tasks.release.guard",
    "PromotionError": "tasks.release.promote",
}
STOPS = {"TerminationSignal": "prefect.exceptions"}  # Prefect's SIGTERM inside a flow


def loaded(errors: dict[str, str], *also: type[BaseException]) -> tuple[type[BaseException], ...]:
    """`also` and the classes of `errors` whose modules are imported (an except clause evaluates it when it
    is reached)."""
    return (*also, *(getattr(sys.modules[module], name) for name, module in errors.items() if module in sys.modules))


class QuietUserErrors(logging.Filter):
    """Prefect logs a failing task and flow with its traceback (twice per error) before the CLI
    prints its own clean `modelforge:` line. For the errors that line fully explains (bad config,
    bad data, failed gates, a busy work dir...) those records go to DEBUG: shown only when
    PREFECT_LOGGING_LEVEL=DEBUG asks for them."""

    def __init__(self, errors: dict[str, str]):
        super().__init__()
        self.errors = errors
        self.names = re.compile(f"exception:? ({'|'.join(errors)}):")

    def filter(self, record: logging.LogRecord) -> bool:
        exc, message = record.exc_info[1] if record.exc_info else None, record.getMessage()
        failed = message.startswith("Finished in state Failed") and self.names.search(message)
        if isinstance(exc, loaded(self.errors)) or failed:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("prefect").isEnabledFor(logging.DEBUG)
        return True


def runner_overrides(spec: str) -> list[str]:
    """`--runner SPEC` as the `--set` overrides it stands for."""
    kind, sep, address = spec.partition("://")
    if kind not in ("local", "dask", "ray", "tcp") or (kind == "local" and sep):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected local, dask, dask://HOST:PORT, ray or ray://HOST:PORT")
    if not sep:
        return [f"runner.kind={kind}", "runner.address=null"]
    if kind == "ray":
        return ["runner.kind=ray", f"runner.address=ray://{address}"]
    return ["runner.kind=dask", f"runner.address=tcp://{address}"]


def _config(args: argparse.Namespace):
    from tasks.config import load_config

    return load_config(args.config, args.set).resolved(args.root)


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.config import load_config
    from tasks.core.prefect import temporary_prefect_server
    from tasks.core.settings import ConfigError
    from tasks.core.stop import stop_on_signals

    try:
        family = load_config(args.config, args.set).family
    except ConfigError:
        family = "classifier"  # its flow records the config error on a FAILED MLflow run, then raises it
    if family == "minilm":
        from flows.encode import optimize_encoder as pipeline
    elif family == "causal_lm":
        from flows.lm import optimize_lm as pipeline
    else:
        from flows.optimize import optimize as pipeline
    # Signals first: a Ctrl-C while the server starts must also stop it.
    with stop_on_signals(), temporary_prefect_server(Path(os.environ["PREFECT_HOME"])):
        result = pipeline(
            config_path=args.config, root=str(args.root), force=args.force, lock_wait_s=args.wait, overrides=args.set
        )
    if result.get("skipped"):
        print(f"modelforge: nothing new: {result['skipped']}")
        return 0
    print(
        f"modelforge: shipped {result['chosen']} -> {result['bundle']} ({result['model_uri']} v{result['version']}); "
        f"{'promoted to champion' if result['promoted'] else 'champion kept'}: {result['promotion_reason']}"
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.core.lock import lock_workdir
    from tasks.core.tracking import setup_tracking
    from tasks.release.guard import clean_leftovers
    from tasks.release.promote import rollback

    cfg = _config(args)
    setup_tracking(cfg.tracking)
    with lock_workdir(cfg.workdir, "modelforge rollback", args.wait):  # never under a run that is shipping
        clean_leftovers(cfg.register_.bundle_dir, cfg.promote.champion_bundle_dir)
        rollback(cfg.register_.model_name, cfg.promote)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tasks.release.compare import compare_runs, format_rows

    print(format_rows(compare_runs(_config(args).tracking, args.last)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.app import serve
    from serve.settings import from_arguments
    from serve.sources import BundleSource, RegistrySource

    settings = from_arguments(args)  # refused (exit 2) before anything loads
    if args.model_uri:
        from tasks.core.tracking import setup_tracking

        setup_tracking(_config(args).tracking)
    return serve(RegistrySource(args.model_uri) if args.model_uri else BundleSource(Path(args.bundle)), settings)


def cmd_export_triton(args: argparse.Namespace) -> int:
    from serve.triton import export_triton

    print(f"modelforge: wrote the Triton model {export_triton(args.bundle, args.out, args.name, args.max_batch_size)}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI on the store the config names (not a hard-coded path)."""
    import subprocess

    uri = _config(args).tracking.uri
    print(f"modelforge: MLflow UI for {uri} on http://{args.host}:{args.port}", flush=True)
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            args.host,
            "--port",
            str(args.port),
        ]
    )


def cmd_data_changed(args: argparse.Namespace) -> int:
    from tasks.core.prefect import prefect_api
    from tasks.data.notify import notify_data_change

    with prefect_api(args.root):
        changed = notify_data_change(_config(args).data, args.root)
    print(
        f"modelforge: data version {changed.md5}: "
        + ("changed, event emitted" if changed.emitted else "unchanged, no event")
    )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from tasks.init_config import init_config

    out = init_config(args.data, args.label, args.model, args.out, args.root)
    print(f"modelforge: wrote {out}; run it with: modelforge run --config {args.out}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from tasks.examples import EXAMPLES

    path = EXAMPLES[args.name](args.root / args.dir)  # a relative folder is in the project, as for every path
    print(f"modelforge: wrote the {args.name} example to {path}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from tasks.core.prefect import prefect_api

    with prefect_api(args.root) as url:
        from flows.deployments import deploy_model, list_deployments, remove_model

        if args.list:
            shown = list_deployments()
        elif args.remove is not None:
            model = args.remove or _config(args).register_.model_name
            shown = remove_model(model)
            print(f"modelforge: removed {len(shown)} deployment(s) of {model} from {url}")
        else:
            shown = deploy_model(args.config, args.root, args.set, cron=args.cron)
        for d in shown:
            print(
                f"{d.name}  ({d.runs_on})\n    id {d.id}; config {d.parameters.get('config_path')}; "
                f"root {d.parameters.get('root')}; --set {' '.join(d.parameters.get('overrides') or []) or '-'}"
            )
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from tasks.core.prefect import start_stack, stop_stack

    if args.action == "stop":
        stopped = stop_stack(args.root)
        print(f"modelforge: stack {'stopped' if stopped else 'not running'} in {args.root}")
        return 0
    stack = start_stack(args.root, args.port)
    logs = Path(stack["logs"])
    print(f"""modelforge: stack {"already running" if stack.get("already_running") else "started"} for {args.root}
Prefect UI:  {stack["api_url"].removesuffix("/api")}   (work pool {stack["pool"]}, one worker)
Deploy:      modelforge deploy --config CONFIG [--set KEY=VALUE ...]   (in this folder)
New data:    modelforge data-changed --config CONFIG
Run now:     PREFECT_API_URL={stack["api_url"]} prefect deployment run optimize/MODEL-nightly
Logs:        {logs}/    Stop: modelforge stack stop""")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command and option; the docs' CLI reference is generated from it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="configs/digits.yaml", help="pipeline config (YAML)")
    common.add_argument(
        "--root",
        default=".",
        type=lambda p: Path(p).resolve(),
        help="project folder: DVC repo; relative paths anchor here",
    )
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key by its dotted path, validated like the file "
        "(e.g. --set search.n_trials=3 --set train.max_epochs=10); repeatable",
    )
    common.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="run/rollback: when another run holds the work dir, wait this long for it "
        "(negative: for ever) instead of failing at once",
    )
    parser = argparse.ArgumentParser(prog="modelforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the pipeline the config's `family` names (classifier: "
        "optimize flow; minilm: optimize-encoder flow; causal_lm: optimize-lm flow) end to end",
    )
    run.add_argument("--force", action="store_true", help="run even when data, config and code are unchanged")
    run.add_argument(
        "--runner",
        type=runner_overrides,
        default=[],
        metavar="SPEC",
        help="where search trials run: local (threads), dask (a LocalCluster of worker processes), "
        "dask://HOST:PORT (a running Dask scheduler), ray, ray://HOST:PORT; sets runner.kind/address",
    )
    run.set_defaults(fn=cmd_run)
    sub.add_parser(
        "rollback",
        parents=[common],
        help="point the champion alias back at the previous champion and republish its bundle",
    ).set_defaults(fn=cmd_rollback)
    cmp_ = sub.add_parser("compare", parents=[common], help="compare the last pipeline runs recorded in MLflow")
    cmp_.add_argument("--last", type=int, default=10)
    cmp_.set_defaults(fn=cmd_compare)
    srv = sub.add_parser("serve", parents=[common], help="serve a bundle or models:/name@alias over HTTP on ORT")
    source = srv.add_mutually_exclusive_group()
    source.add_argument("--bundle", default="deploy/champion", help="bundle folder to serve and watch")
    source.add_argument("--model-uri", help="models:/<name>@<alias> from the MLflow registry")
    from serve.settings import add_arguments

    add_arguments(srv)
    srv.set_defaults(fn=cmd_serve)
    triton = sub.add_parser(
        "export-triton",
        parents=[common],
        help="write a bundle as a Triton Inference Server "
        "model repository (config.pbtxt with dynamic batching + 1/model.onnx)",
    )
    triton.add_argument("--bundle", type=Path, default=Path("deploy/champion"), help="bundle folder to export")
    triton.add_argument("--out", type=Path, required=True, help="model repository folder (created if needed)")
    triton.add_argument("--name", help="model name in the repository (default: the registered model's name)")
    triton.add_argument("--max-batch-size", type=int, default=64, help="Triton's max_batch_size")
    triton.set_defaults(fn=cmd_export_triton)
    ui = sub.add_parser("ui", parents=[common], help="the MLflow UI on the config's tracking store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(fn=cmd_ui)
    sub.add_parser(
        "data-changed",
        parents=[common],
        help="version data/ with DVC and emit a Prefect event if "
        "its version changed (triggers the on-new-data deployments of the models on that data)",
    ).set_defaults(fn=cmd_data_changed)
    init = sub.add_parser(
        "init",
        parents=[common],
        help="inspect your data (a CSV/Parquet/JSONL table, labelled "
        "texts, or a folder of image class folders) and write a complete, commented config for it",
    )
    init.add_argument(
        "--data",
        required=True,
        type=Path,
        help="the data, inside the project: a table file (rows "
        "or texts) or a folder with one sub-folder of images per class",
    )
    init.add_argument("--label", help="the column holding each row's class (tables and texts)")
    init.add_argument(
        "--model",
        help="model family to search (mlp, cnn, resnet, text), your own module as "
        "package.module:function (function(num_classes, input_shape) -> nn.Module), or a pretrained "
        "text model to fine-tune (minilm, or a local Hugging Face folder), or a causal LM (a Hugging Face "
        "folder or a .gguf file, with --data a corpus folder); default: what suits the data",
    )
    init.add_argument("--out", required=True, type=Path, help="config file to write (never overwritten)")
    init.set_defaults(fn=cmd_init)
    from tasks.examples import EXAMPLES

    example = sub.add_parser(
        "example",
        parents=[common],
        help="write an example data set, offline, as a user would bring it (e.g. modelforge example wine data)",
    )
    example.add_argument("name", choices=sorted(EXAMPLES))
    example.add_argument("dir", type=Path, help="folder to write it to (relative: under --root)")
    example.set_defaults(fn=cmd_example)
    dep = sub.add_parser(
        "deploy",
        parents=[common],
        help="create/update the config's model's nightly and "
        "on-new-data Prefect deployments, with the --set overrides (on the project's stack, or "
        "PREFECT_API_URL)",
    )
    dep.add_argument("--cron", default="0 2 * * *", help="nightly schedule (UTC)")
    what = dep.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the deployments of every model on the server")
    what.add_argument(
        "--remove",
        nargs="?",
        const="",
        metavar="MODEL",
        help="remove a model's deployments (default: the config's register.model_name)",
    )
    dep.set_defaults(fn=cmd_deploy)
    stack = sub.add_parser(
        "stack",
        parents=[common],
        help="start or stop the project's Prefect server, process "
        "work pool and worker (logs and pids in .modelforge/), for deployments to run on",
    )
    stack.add_argument("action", choices=["start", "stop"])
    stack.add_argument("--port", type=int, default=4200, help="the server's port on 127.0.0.1")
    stack.set_defaults(fn=cmd_stack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.set = [*args.set, *getattr(args, "runner", [])]

    embedded_defaults(args.root)
    from tasks.core.stop import exit_code, interruption

    quiet = QuietUserErrors(EXPLAINED)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(quiet)
    try:
        return args.fn(args)
    except loaded(STOPS, KeyboardInterrupt) as err:
        reason = interruption(err)
        assert reason is not None  # a Ctrl-C or a TerminationSignal is always a stop
        print(
            f"modelforge: interrupted ({reason}); the MLflow run is marked KILLED, finished trials are kept: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return exit_code(reason)
    except loaded(EXPLAINED, ValueError, FileNotFoundError) as err:
        logging.getLogger("modelforge").debug("the error's traceback", exc_info=True)
        print(f"modelforge: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    finally:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).removeFilter(quiet)


if __name__ == "__main__":
    sys.exit(main())
