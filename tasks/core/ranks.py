"""Spawned training ranks of one process group, supervised from this process: the data-parallel
classifier training (`tasks/train/ddp.py`) and the causal-LM fine-tune (`tasks/lm/lora.py`) run on it.

Light on purpose (torch only): every rank imports this module, and a rank's start-up is dead time.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import torch

from tasks.core.prefect import free_port
from tasks.core.stop import check_stop


def _entry(target: Callable, rank: int, world: int, port: int, queue, args: tuple) -> None:
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches every rank; the driver decides
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores, not oversubscribe
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        target(rank, world, torch.device("cuda", rank) if cuda else torch.device("cpu"), queue, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(
    target: Callable,
    args: tuple,
    processes: int,
    on_record: Callable[[dict], None] | None = None,
    kind: str = "ddp",
    what: str = "data-parallel training",
    preload: list[str] | None = None,
) -> None:
    """`target(rank, world, device, queue, *args)` in `processes` spawned ranks (`kind`-rank-N) of one process
    group (gloo on CPU, NCCL with a GPU per rank); what the ranks put on `queue` goes to `on_record`. A stop
    request terminates the ranks; a rank that dies ends them all with one error.

    With `preload` (module names) the ranks fork from a server process that imported those modules once (the
    first call pays for it): importing peft and transformers takes each spawned rank 10-15 s here."""
    mp = torch.multiprocessing
    ctx = mp.get_context("forkserver") if preload else mp.get_context("spawn")
    if preload:
        ctx.set_forkserver_preload(preload)
    queue = ctx.SimpleQueue()

    def relay() -> None:
        while not queue.empty():
            record = queue.get()
            if on_record:
                on_record(record)

    port = free_port()
    ranks = [
        ctx.Process(target=_entry, args=(target, r, processes, port, queue, args), daemon=True, name=f"{kind}-rank-{r}")
        for r in range(processes)
    ]
    for p in ranks:
        p.start()
    try:
        while any(p.is_alive() for p in ranks):
            relay()
            if any(p.exitcode not in (None, 0) for p in ranks):
                break  # one rank died: the others would wait for its collectives until gloo's timeout
            check_stop()
            time.sleep(0.05)
    finally:
        for p in ranks:
            if p.is_alive():
                p.terminate()
            p.join()
    relay()
    if failed := [(p.name, p.exitcode) for p in ranks if p.exitcode != 0]:
        raise RuntimeError(
            f"{what} failed: {', '.join(f'{n} exit code {c}' for n, c in failed)} "
            "(the rank's traceback is printed above)"
        )
