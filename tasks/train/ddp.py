"""Data-parallel training: `fit` on N processes of this machine under DistributedDataParallel.

Each rank trains on its shard of every global batch and DDP averages the gradients (all-reduce:
gloo on CPU, NCCL when there is one GPU per rank), so N ranks train the same model one process
would, on the same global batch size. The ranks are spawned processes; this process supervises
them: it relays rank 0's epoch records, turns a stop request (Ctrl-C, SIGTERM, a failed stage) into
terminating the ranks, and loads rank 0's final weights back into the caller's model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.core.ranks import run_ranks
from tasks.train.loop import FitResult, TrainParams, fit


def _fit_rank(
    rank: int,
    world: int,
    device: torch.device,
    queue,
    model: nn.Module,
    train: tuple,
    val: tuple,
    params: TrainParams,
    out: str,
    restore_best: bool,
) -> None:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model.to(device), device_ids=[rank] if device.type == "cuda" else None)
    result = fit(
        ddp,
        train,
        val,
        params,
        on_epoch=queue.put if rank == 0 else None,
        shard=(rank, world),
        restore_best=restore_best,
    )
    if rank == 0:
        state = {k: v.cpu() for k, v in ddp.module.state_dict().items()}
        torch.save({"model": state, "result": asdict(result)}, out)


def fit_parallel(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    params: TrainParams,
    processes: int,
    on_epoch: Callable[[dict], None] | None = None,
    restore_best: bool = True,
) -> FitResult:
    """`fit` over `processes` DDP ranks; returns with `model` holding the trained weights (as `fit`'s
    `restore_best` says: the best val epoch's, or the last)."""
    with tempfile.TemporaryDirectory(prefix="modelforge-ddp-") as tmp:
        out = str(Path(tmp) / "rank0.pt")
        run_ranks(_fit_rank, (model, train, val, params, out, restore_best), processes, on_epoch)
        saved = torch.load(out, weights_only=True)
    model.load_state_dict(saved["model"])
    model.eval()
    return FitResult(**saved["result"])
