"""Data-parallel training: `fit` on N processes of this machine under DistributedDataParallel.

Each rank trains on its shard of every global batch and DDP averages the gradients (all-reduce:
gloo on CPU, NCCL when there is one GPU per rank), so N ranks train the same model one process
would, on the same global batch size. The ranks are spawned processes; this process supervises
them: it relays rank 0's epoch records, turns a stop request (Ctrl-C, SIGTERM, a failed stage) into
terminating the ranks, and loads rank 0's final weights back into the caller's model.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.core.prefect import free_port
from tasks.core.stop import check_stop
from tasks.train.loop import FitResult, TrainParams, fit


def _rank(
    rank: int,
    world: int,
    port: int,
    model: nn.Module,
    train: tuple,
    val: tuple,
    params: TrainParams,
    out: str,
    queue,
    restore_best: bool,
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches every rank; the driver decides
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores, not oversubscribe
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        ddp = DistributedDataParallel(model.to(device), device_ids=[rank] if cuda else None)
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
    finally:
        dist.destroy_process_group()


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
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()

    def relay_epochs() -> None:  # rank 0's epoch records, to the caller
        while not queue.empty():
            record = queue.get()
            if on_epoch:
                on_epoch(record)

    with tempfile.TemporaryDirectory(prefix="modelforge-ddp-") as tmp:
        out = str(Path(tmp) / "rank0.pt")
        port = free_port()
        ranks = [
            ctx.Process(
                target=_rank,
                args=(r, processes, port, model, train, val, params, out, queue, restore_best),
                daemon=True,
                name=f"ddp-rank-{r}",
            )
            for r in range(processes)
        ]
        for p in ranks:
            p.start()
        try:
            while any(p.is_alive() for p in ranks):
                relay_epochs()
                if any(p.exitcode not in (None, 0) for p in ranks):
                    break  # one rank died: the others would wait for its gradients until gloo's timeout
                check_stop()
                time.sleep(0.05)
        finally:
            for p in ranks:
                if p.is_alive():
                    p.terminate()
                p.join()
        relay_epochs()
        if failed := [(p.name, p.exitcode) for p in ranks if p.exitcode != 0]:
            raise RuntimeError(
                f"data-parallel training failed: {', '.join(f'{n} exit code {c}' for n, c in failed)} "
                "(the rank's traceback is printed above)"
            )
        saved = torch.load(out, weights_only=True)
    model.load_state_dict(saved["model"])
    model.eval()
    return FitResult(**saved["result"])
