"""A causal-LM fine-tune as one rank under torchrun, from the project's config: the same settings a run
uses, on several machines (`torchrun ... -m tasks.torchrun_finetune CONFIG OUT`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from tasks.config import load_config
from tasks.lm.lora import adapter_state, fit_rank, lora_model, merge
from tasks.lm.train import check_finetune


def torchrun_rank(config: str, out: str) -> None:
    """One rank of the config's fine-tune under torchrun, e.g. on each of M machines:
    `torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m tasks.torchrun_finetune
    CONFIG OUT`, run from the project folder (the corpus as the pipeline versioned it, on every machine).
    Rank 0 writes the merged Hugging Face folder to OUT, which a run then takes as `lm.model`."""
    import torch.distributed as dist

    cfg = load_config(config).resolved(Path.cwd())
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        ft = cfg.finetune.model_copy(update={"processes": world})
        data = check_finetune(cfg.lm.model, cfg.data.dir, ft)
        model, result = fit_rank(
            rank, world, device, cfg.lm.model, data.train, data.val, ft, print if rank == 0 else None
        )
        state = adapter_state(model)
        if rank == 0:
            merged = lora_model(cfg.lm.model, ft)
            merged.load_state_dict(state, strict=False)
            merge(merged, cfg.lm.model, Path(out))
            print(
                f"[finetune] validation perplexity {result.base_perplexity:.3f} -> {result.best_perplexity:.3f} "
                f"on {world} ranks ({ft.parallel}); merged into {out}"
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torchrun_rank(*sys.argv[1:])
