"""Scale-out benchmark: search trials per hour on 1 vs 2 Dask worker processes, and final training
time on 1 vs 2 DistributedDataParallel processes, measured side by side in one run.

    .venv/bin/python bench/scale.py [--trials 12] [--epochs 6] [--ddp-epochs 15]

Trials run the pipeline's own `run_trials` on a Dask LocalCluster (the same cluster settings as
`runner.kind: dask`), each worker fetching the data version by md5 from a DVC remote; every trial
trains the same architecture, so trials per hour compare like with like. DDP trains a wider CNN on
digits with the pipeline's `fit` / `fit_parallel`. Not a test: its figures are what it reports.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def trials_per_hour(workers: int, ref, trials: int, epochs: int, work: Path) -> float:
    from distributed import Client, LocalCluster

    from tasks.search.runner import local_cluster_kwargs
    from tasks.search.space import SearchConfig
    from tasks.search.trials import run_trials

    space = {
        "families": ["cnn"],
        "depth": [1, 1],
        "width": [64, 64],
        "channels": [16, 16],
        "batch_sizes": [32],
        "optimizers": ["adam"],
        "dropout": [0.0, 0.0],
    }
    cfg = SearchConfig(sampler="random", n_trials=trials, epochs=epochs, workers=max(2, workers), space=space)
    out = work / f"search-{workers}"
    with LocalCluster(**local_cluster_kwargs(workers)) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts
        start = time.perf_counter()
        ran = client.gather(
            [client.submit(run_trials, cfg, ref, out, f"scale-{workers}", worker=i, pure=False) for i in range(workers)]
        )
        seconds = time.perf_counter() - start
    print(f"[bench] {workers} Dask worker process(es): {sum(ran)} trials in {seconds:.1f}s")
    return sum(ran) / seconds * 3600


def ddp_seconds(processes: int, splits, epochs: int) -> tuple[float, float, float]:
    from tasks.models import Arch, build_model
    from tasks.train.ddp import fit_parallel
    from tasks.train.loop import TrainParams, accuracy, fit

    torch.manual_seed(0)
    model = build_model(Arch("cnn", 10, (1, 8, 8), conv=(32, 64), hidden=(128,)))
    params = TrainParams(lr=0.003, optimizer="adam", epochs=epochs, patience=epochs, batch_size=64)
    start = time.perf_counter()
    result = (
        fit(model, splits.train, splits.val, params)
        if processes == 1
        else fit_parallel(model, splits.train, splits.val, params, processes)
    )
    wall = time.perf_counter() - start
    print(
        f"[bench] DDP {processes} process(es): training {result.seconds:.1f}s, wall {wall:.1f}s "
        f"(incl. starting the ranks), test accuracy {accuracy(model, *splits.test):.4f}"
    )
    return result.seconds, wall, accuracy(model, *splits.test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial")
    parser.add_argument("--ddp-epochs", type=int, default=15)
    args = parser.parse_args()

    from tasks.data import load_splits
    from tasks.data.digits import DataConfig
    from tasks.data.version import version_data
    from tasks.search.fetch import DataRef

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    (work / "project").mkdir()
    data = version_data(DataConfig(dvc_remote=str(work / "remote")), work / "project")
    ref = DataRef(data.md5, data.remote, str(work / "worker-cache"))
    rate = {n: trials_per_hour(n, ref, args.trials, args.epochs, work) for n in (1, 2)}
    ddp = {n: ddp_seconds(n, load_splits(data.dir), args.ddp_epochs) for n in (1, 2)}

    print(f"\n{os.cpu_count()} cores, torch {torch.__version__}")
    print("| setting | 1 process | 2 processes | ratio |\n|---|---|---|---|")
    print(f"| search trials per hour (Dask workers) | {rate[1]:.0f} | {rate[2]:.0f} | {rate[2] / rate[1]:.2f}x |")
    print(
        f"| DDP training seconds ({args.ddp_epochs} epochs) | {ddp[1][0]:.1f} | {ddp[2][0]:.1f} | "
        f"{ddp[1][0] / ddp[2][0]:.2f}x speed-up |"
    )
    print(
        f"| DDP wall seconds incl. starting ranks | {ddp[1][1]:.1f} | {ddp[2][1]:.1f} | {ddp[1][1] / ddp[2][1]:.2f}x |"
    )
    print(f"| DDP test accuracy | {ddp[1][2]:.4f} | {ddp[2][2]:.4f} | {ddp[2][2] - ddp[1][2]:+.4f} |")
    print(f"RESULT dask_trials_per_hour_ratio={rate[2] / rate[1]:.2f} ddp_speedup={ddp[1][0] / ddp[2][0]:.2f}")


if __name__ == "__main__":
    main()
