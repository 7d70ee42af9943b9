"""Training: one loop (SGD/Adam, cosine schedule, early stopping on val accuracy) for every stage
that trains — search trials, the final model, pruning fine-tunes and distillation students."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import task
from pydantic import Field
from torch import nn

from tasks.core.fingerprint import code_version, inputs_version
from tasks.core.settings import ConfigError, Section
from tasks.data import load_splits
from tasks.models import (
    Arch,
    ModelConfig,
    arch_from_params,
    build_model,
    count_params,
    load_checkpoint,
    save_checkpoint,
    vocab_of,
)
from tasks.models.hf import pretrained_folder
from tasks.train.loop import FitResult, TrainParams, accuracy, fit


class TrainConfig(Section):
    """Final training of the searched configuration (its lr, optimizer, batch size, weight decay and
    schedule come from the search)."""

    max_epochs: int = Field(40, ge=1, description="Upper bound on training epochs.")
    patience: int = Field(6, ge=1, description="Early stopping: epochs without val-accuracy gain before stopping.")
    init_from: Path | None = Field(None, description="Checkpoint to fine-tune from instead of a random init.")
    seed: int = Field(0, description="Torch seed for initialisation and shuffling.")
    refit: bool = Field(
        False,
        description="Once early stopping on val has found the best epoch count, train again "
        "from the same start on train + val for that many epochs (small data sets gain most).",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Data-parallel training (DistributedDataParallel) over this many "
        "processes on this machine: gloo on CPU, NCCL with one GPU each when there are enough.",
    )


@dataclass(frozen=True)
class TrainedModel:
    checkpoint: Path
    val_accuracy: float
    test_accuracy: float
    params: int
    epochs_run: int
    processes: int  # data-parallel ranks that trained it, as their process group counted them


def check_init_checkpoint(cfg: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> Arch | None:
    """Fail before any training if the fine-tuning checkpoint is unreadable or does not fit the data."""
    if cfg.init_from is None:
        return None
    return _load_init(cfg, num_classes, input_shape)[1]


def _load_init(cfg: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, Arch]:
    assert cfg.init_from is not None  # both callers check it first
    model, arch, _ = load_checkpoint(cfg.init_from)
    if arch.num_classes != num_classes or tuple(arch.input_shape) != tuple(input_shape):
        raise ValueError(
            f"train.init_from {cfg.init_from}: model has {arch.num_classes} classes / input {arch.input_shape}, "
            f"data has {num_classes} classes / input {tuple(input_shape)}"
        )
    return model, arch


def check_model_inputs(
    train: TrainConfig, model: ModelConfig, num_classes: int, input_shape: tuple[int, ...], root: Path
) -> None:
    """Before any training, one ConfigError with every problem of the model the run would train: a
    user's module that does not import, takes the wrong arguments, returns no module or the wrong
    logits, weights that do not fit it; a fine-tuning checkpoint that is unreadable or for other data.

    The project folder goes on `sys.path`, so a user's `package.module` there imports in every stage."""
    problems = []
    if train.init_from is not None:
        try:
            check_init_checkpoint(train, num_classes, input_shape)
        except ValueError as err:
            hint = (
                " (a plain state_dict: for your own module's weights set model.spec and model.weights)"
                if "'arch'" in str(err)
                else ""
            )
            problems.append(f"train.init_from: {err}{hint}")
    if name := model.spec or model.pretrained:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            net = build_model(
                arch_from_params({"family": model.family, **model.fixed_params()}, num_classes, input_shape)
            ).eval()
            with torch.no_grad():
                out = net(torch.zeros(2, *input_shape))
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                problems.append(
                    f"model {name}: a batch of 2 samples of shape {list(input_shape)} gave "
                    f"{got}; the data has {num_classes} classes, so [2, {num_classes}] logits are needed"
                )
        except Exception as err:  # whatever the user's module raises is reported, with its type
            problems.append(
                f"model: {err}"
                if isinstance(err, ValueError)
                else f"model {name}: running it on a batch of shape {[2, *input_shape]} "
                f"failed: {type(err).__name__}: {err}"
            )
    if problems:
        raise ConfigError(
            f"the model cannot be trained on this data ({len(problems)} problem(s)):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def _initial_model(cfg: TrainConfig, best: dict, splits) -> tuple[nn.Module, Arch]:
    """The model training starts from: `cfg.init_from`'s weights (checked against the data), or the
    searched architecture seeded."""
    if cfg.init_from is not None:
        return _load_init(cfg, splits.num_classes, tuple(splits.manifest["input_shape"]))
    arch = arch_from_params(best, splits.num_classes, splits.manifest["input_shape"], vocab_of(splits.manifest))
    torch.manual_seed(cfg.seed)
    return build_model(arch), arch


def train_model(cfg: TrainConfig, best: dict, data_dir: Path, data_version: str, out_dir: Path) -> TrainedModel:
    """Train the searched configuration (`best`: architecture and optimizer settings of the chosen
    trial) to convergence with early stopping; fine-tune from `cfg.init_from` when set. With
    `cfg.refit`, train once more from the same start on train + val for the best epoch count found.

    Writes under `out_dir/<cache key>/`: the same data version, config and code reuse the result."""
    splits = load_splits(data_dir)
    model, arch = _initial_model(cfg, best, splits)
    if cfg.init_from is not None:
        print(f"[train] fine-tuning from {cfg.init_from} ({arch.family}, {count_params(model)} params)")
    params = TrainParams.from_search(best, cfg.max_epochs, cfg.patience, cfg.seed)

    def progress(stage: str, epochs: int) -> Callable[[dict], None]:
        return lambda r: print(
            f"[{stage}] epoch {r['epoch']:3d}/{epochs} loss {r['train_loss']:.4f} val_acc {r['val_accuracy']:.4f}"
        )

    def run_fit(model: nn.Module, train, p: TrainParams, stage: str, restore_best: bool = True) -> FitResult:
        if cfg.processes > 1:
            from tasks.train.ddp import fit_parallel

            return fit_parallel(
                model,
                train,
                splits.val,
                p,
                cfg.processes,
                on_epoch=progress(stage, p.epochs),
                restore_best=restore_best,
            )
        return fit(model, train, splits.val, p, on_epoch=progress(stage, p.epochs), restore_best=restore_best)

    result = run_fit(model, splits.train, params, "train")
    summary = (
        f"best epoch {result.best_epoch}/{result.epochs_run}: val {result.best_val_accuracy:.4f} "
        f"test {accuracy(model, *splits.test):.4f}"
    )
    if cfg.refit:
        # The end of the best plateau: a few val samples often hit their best accuracy early and hold it,
        # and the first epoch there would undertrain the refit.
        epochs = max(r["epoch"] for r in result.history if r["val_accuracy"] == result.best_val_accuracy)
        print(
            f"[train] {summary}; refitting on train + val ({len(splits.train[1]) + len(splits.val[1])} samples) "
            f"for {epochs} epochs"
        )
        model, _ = _initial_model(cfg, best, splits)
        params = dataclasses.replace(params, epochs=epochs, patience=epochs)
        both = tuple(np.concatenate([a, b]) for a, b in zip(splits.train, splits.val, strict=True))
        refit = {"epochs": epochs, "samples": len(both[1])}
        # Val is now training data: its accuracy cannot pick an epoch, so the last one is kept.
        seconds = result.seconds + run_fit(model, both, params, "refit", restore_best=False).seconds
    test_acc = accuracy(model, *splits.test)
    out_dir = Path(out_dir) / train_cache_key(cfg, best, data_version)
    ckpt = save_checkpoint(
        out_dir / "baseline.pt",
        model,
        arch,
        {
            "train": asdict(params),
            "search": best,
            "data_version": data_version,
            "processes": result.processes,
            **({"refit": refit} if cfg.refit else {}),
        },
    )
    (out_dir / "train_history.json").write_text(json.dumps(result.history, indent=1))
    ddp = f" on {result.processes} DDP processes" if result.processes > 1 else ""
    if cfg.refit:
        print(f"[train] refit: test {test_acc:.4f} ({seconds:.1f}s{ddp})")
    else:
        print(f"[train] {summary} ({result.seconds:.1f}s{ddp})")
    return TrainedModel(
        ckpt, result.best_val_accuracy, test_acc, count_params(model), result.epochs_run, result.processes
    )


def train_cache_key(cfg: TrainConfig, best: dict, data_version: str) -> str:
    """Same data, config, code and user model files (module source, weights, checkpoints): same key."""
    user = inputs_version(
        best.get("spec"), [best.get("weights"), cfg.init_from, pretrained_folder(best.get("pretrained"))]
    )
    payload = json.dumps([cfg.model_dump(mode="json"), best, data_version, code_version(), user], sort_keys=True)
    return f"train-{data_version[:12]}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _cached_train_key(_context, p: dict) -> str:
    # out_dir is part of the key: a result cached for another work dir points at files elsewhere.
    where = hashlib.sha256(str(p["out_dir"]).encode()).hexdigest()[:8]
    return f"{train_cache_key(p['cfg'], p['best'], p['data_version'])}-{where}"


check_model_inputs_task = task(name="check_model_inputs")(check_model_inputs)
# JSON, not Prefect's default pickle: a cache hit reads this file back, and the work dir must hold
# nothing that runs code when it is loaded.
train_model_task = task(
    name="train_model", cache_key_fn=_cached_train_key, persist_result=True, result_serializer="json"
)(train_model)
