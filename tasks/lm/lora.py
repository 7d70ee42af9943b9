"""LoRA fine-tuning of a causal LM on the corpus (configured by `finetune:`, `tasks/lm/finetune.py`; the
stage, its checks and its search are `tasks/lm/train.py`). Every rank imports this module: torch, peft and
transformers only.

The adapter comes from `peft`; the loss is the next-token loss on packed fixed-length windows of the
corpus's calibration documents (the ones never used for validation or test), a chat's loss on its
assistant tokens only. Early stopping keeps the epoch with the best validation perplexity (epoch 0, the
base model, included: a fine-tune that only hurts merges to the base weights). With `processes > 1` the
ranks split every step's windows: `ddp` replicates the model, `fsdp` shards it with FSDP2's
`fully_shard` (each rank holds 1/N of every parameter, gradient and optimizer state). Each step's loss is
the mean over the global batch's target tokens whatever the rank count, so N ranks follow one process's
curve. The adapter is logged to MLflow and merged into the base weights, saved as the plain Hugging Face
folder the ONNX export reads.
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from tasks.core.ranks import run_ranks
from tasks.core.settings import ConfigError
from tasks.core.stop import check_stop
from tasks.data.corpus import Document
from tasks.lm.finetune import FinetuneConfig

if TYPE_CHECKING:
    from peft import PeftModel

# Linear layer names of the decoder architectures tasks/lm/model.py accepts (Phi-3 fuses qkv and gate_up).
ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
IGNORE = -100  # a label without loss


@dataclass(frozen=True)
class Windows:
    ids: np.ndarray  # [n, window] token ids
    labels: np.ndarray  # [n, window]: the id where the token counts in the loss, IGNORE where not

    def __len__(self) -> int:
        return len(self.ids)


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ConfigError(
            "the tokenizer's chat template renders a conversation differently from its first turns, "
            'so the assistant tokens cannot be told apart; give the chats as plain "text"'
        )
    return text[len(prefix) :]


def encode(tokenizer, doc: Document) -> tuple[list[int], list[bool]]:
    """A document's token ids and which of them count in the loss: all of a text (with the end-of-text token),
    a chat's assistant turns (rendered turn by turn through the chat template)."""
    if isinstance(doc, str):
        ids = tokenizer(doc)["input_ids"] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        return ids, [True] * len(ids)
    ids, learn, done = [], [], ""

    def add(text: str, counts: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        learn.extend([counts] * len(piece))

    for i, message in enumerate(doc):
        if message["role"] == "assistant" and i:
            head = tokenizer.apply_chat_template(doc[:i], add_generation_prompt=True, tokenize=False)
            add(_after(head, done), False)
            done = head
        full = tokenizer.apply_chat_template(doc[: i + 1], tokenize=False)
        add(_after(full, done), message["role"] == "assistant")
        done = full
    return ids, learn


def pack(tokenizer, docs: list[Document], window: int, limit: int | None) -> Windows:
    """The documents joined and cut into whole windows (at most `limit`)."""
    ids: list[int] = []
    learn: list[bool] = []
    for doc in docs:
        a, b = encode(tokenizer, doc)
        ids += a
        learn += b
        if limit and len(ids) >= window * limit:
            break
    n = min(len(ids) // window, limit or len(ids))
    tokens = np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)
    return Windows(tokens, np.where(np.asarray(learn[: n * window], bool).reshape(n, window), tokens, IGNORE))


def target_modules(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """The linear layer names the adapter wraps; a name the model lacks is a ConfigError naming what it has."""
    names = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not n.endswith("lm_head")
        }
    )
    if cfg.modules:
        if unknown := [m for m in cfg.modules if m not in names]:
            raise ConfigError(f"finetune.modules {unknown}: no such linear layer in the model (it has {names})")
        return list(cfg.modules)
    parts = {"attention": [ATTENTION], "attention+mlp": [ATTENTION, MLP]}[cfg.target]
    found = [[n for n in names if n in part] for part in parts]
    if not all(found):
        raise ConfigError(
            f"finetune.target {cfg.target}: the model has none of "
            f"{[p for p, f in zip(parts, found, strict=True) if not f]} "
            f"(its linear layers: {names}); name the layers to adapt in finetune.modules"
        )
    return [n for f in found for n in f]


def lora_model(hf_dir: Path, cfg: FinetuneConfig) -> PeftModel:
    """The FP32 model with a fresh LoRA adapter (seeded: every rank builds the same one)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; it only scales by alpha / rank
        lora_dropout=cfg.dropout,
        bias="none",
        target_modules=target_modules(base, cfg),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    assert isinstance(model, PeftModel)  # a mixed model only when asked for
    return model


def nll(net: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of the labelled tokens."""
    logits = net(input_ids=ids).logits[:, :-1]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def val_perplexity(net: nn.Module, val: Windows, batch: int, rank: int = 0, world: int = 1) -> float:
    """Perplexity of the validation windows, each rank scoring every world-th one (ranks short of one pad with
    a window without labels: under FSDP every rank must run the same forwards)."""
    net.eval()
    mine = list(range(rank, len(val), world))
    pad = -(-len(val) // world) - len(mine)
    ids = torch.from_numpy(val.ids[mine + [0] * pad])
    labels = torch.from_numpy(val.labels[mine + [0] * pad])
    labels[len(mine) :] = IGNORE
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            total[0] += nll(net, ids[i : i + batch], labels[i : i + batch]).double()
        total[1] = float((labels[:, 1:] != IGNORE).sum())
    total = _all_sum(total, world)
    return float(math.exp(total[0] / total[1]))


def _held(t: torch.Tensor) -> int:
    """Elements this rank stores: a DTensor's local shard, or the whole tensor."""
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def _peak_rss_mb() -> float:
    try:  # VmHWM, reset at the start of training (clear_refs 5): the training peak, not the model loading's
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):  # not Linux: the lifetime peak is reported
        Path("/proc/self/clear_refs").write_text("5")


@dataclass
class FinetuneResult:
    base_perplexity: float  # validation, before any step
    best_perplexity: float
    best_epoch: int  # 0: no epoch beat the base model (its weights are kept)
    epochs_run: int
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    processes: int = 1
    parallel: str = "none"
    shards: list[dict] = field(default_factory=list)  # per rank: elements held, peak memory, step time


def train_loop(
    net: nn.Module,
    model: nn.Module,
    train: Windows,
    val: Windows,
    cfg: FinetuneConfig,
    rank: int = 0,
    world: int = 1,
    on_record: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Train the adapter of `model` (`net`: the module to run, a DDP wrapper or the model itself); returns with
    the best validation epoch's adapter in place. A stop request ends it between two steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    batch = min(cfg.batch_size, len(train) - len(train) % world)
    steps_per_epoch = len(train) // batch
    total, warm = steps_per_epoch * cfg.epochs, int(cfg.warmup * steps_per_epoch * cfg.epochs)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to a tenth of the peak
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids, labels = torch.from_numpy(train.ids), torch.from_numpy(train.labels)
    eval_batch = max(1, batch // world)
    emit = on_record or (lambda _r: None)
    start = time.perf_counter()
    base = best = val_perplexity(net, val, eval_batch, rank, world)
    history = [{"epoch": 0, "step": 0, "val_perplexity": base}]
    emit(history[-1])
    best_epoch, best_state = 0, [p.detach().clone() for p in trainable]
    step, step_seconds = 0, []
    _reset_peak_rss()
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order = torch.randperm(len(train), generator=gen)
        for i in range(steps_per_epoch):
            check_stop()
            tick = time.perf_counter()
            idx = order[i * batch : (i + 1) * batch]
            count = max(1, int((labels[idx][:, 1:] != IGNORE).sum()))
            mine = idx[rank::world]
            loss_sum = nll(net, ids[mine], labels[mine])
            loss = float(_all_sum(loss_sum.detach().clone(), world)) / count
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"fine-tuning diverged at step {step + 1} (loss {loss}); lower finetune.lr (now {cfg.lr:g})"
                )
            (loss_sum * world / count).backward()  # the ranks average gradients: the global batch's mean
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            step_seconds.append(time.perf_counter() - tick)
            emit({"step": step, "train_loss": loss, "lr": sched.get_last_lr()[0]})
        ppl = val_perplexity(net, val, eval_batch, rank, world)
        history.append({"epoch": epoch, "step": step, "val_perplexity": ppl})
        emit(history[-1])
        if ppl < best:
            best, best_epoch, best_state = ppl, epoch, [p.detach().clone() for p in trainable]
        elif epoch - best_epoch >= cfg.patience:
            break
    with torch.no_grad():
        for p, kept in zip(trainable, best_state, strict=True):
            p.copy_(kept)
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    shard = {
        "rank": rank,
        "params_held": sum(_held(p) for p in model.parameters()),
        "params_total": sum(p.numel() for p in model.parameters()),
        "optimizer_state_held": sum(_held(v) for v in states),
        "optimizer_state_total": sum(v.numel() for v in states),
        "peak_rss_mb": _peak_rss_mb(),
        "step_seconds_median": float(np.median(step_seconds)) if step_seconds else 0.0,
    }
    return FinetuneResult(
        base,
        best,
        best_epoch,
        epoch,
        step,
        time.perf_counter() - start,
        history,
        world,
        cfg.parallel if world > 1 else "none",
        [shard],
    )


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full tensors by parameter name (under FSDP a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(dict[str, torch.Tensor], {k: v for k, v in state.items() if "lora_" in k})  # full: plain tensors


def shard_model(model: PeftModel, world: int, device: torch.device) -> None:
    """FSDP2: every decoder layer its own unit (gathered one at a time), then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    layers = next(
        m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == model.config.num_hidden_layers
    )
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)  # the root too: else it stays gathered after eval


def fit_rank(
    rank: int,
    world: int,
    device: torch.device,
    hf_dir: Path,
    train: Windows,
    val: Windows,
    cfg: FinetuneConfig,
    on_record: Callable[[dict], None] | None = None,
) -> tuple[nn.Module, FinetuneResult]:
    """One rank of an initialised process group: its adapted model (sharded under fsdp) and its result."""
    from torch.nn.parallel import DistributedDataParallel

    model = lora_model(hf_dir, cfg).to(device)
    if cfg.parallel == "fsdp":
        shard_model(model, world, device)
        net: nn.Module = model
    else:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, train_loop(net, model, train, val, cfg, rank, world, on_record)


def _rank(
    rank: int,
    world: int,
    device: torch.device,
    queue,
    hf_dir: Path,
    train: Windows,
    val: Windows,
    cfg: FinetuneConfig,
    out: str,
) -> None:
    model, result = fit_rank(rank, world, device, hf_dir, train, val, cfg, queue.put if rank == 0 else None)
    queue.put({"shard": result.shards[0]})
    state = adapter_state(model)
    if rank == 0:
        torch.save({"adapter": state, "result": asdict(result)}, out)


def train_lora(
    hf_dir: Path, train: Windows, val: Windows, cfg: FinetuneConfig, on_record: Callable[[dict], None] | None = None
) -> tuple[PeftModel, FinetuneResult]:
    """The adapted model and its result, trained here or on `cfg.processes` ranks (`cfg.parallel`)."""
    model = lora_model(hf_dir, cfg)
    if cfg.processes == 1:
        return model, train_loop(model, model, train, val, cfg, on_record=on_record)
    shards: list[dict] = []

    def relay(record: dict) -> None:
        if "shard" in record:
            shards.append(record["shard"])
        elif on_record:
            on_record(record)

    with tempfile.TemporaryDirectory(prefix="modelforge-lora-") as tmp:
        out = str(Path(tmp) / "rank0.pt")
        run_ranks(
            _rank,
            (Path(hf_dir), train, val, cfg, out),
            cfg.processes,
            relay,
            kind=cfg.parallel,
            what=f"{cfg.parallel} fine-tuning",
            preload=[__name__, "peft", "transformers"],
        )
        saved = torch.load(out, weights_only=True)
    missing = set(saved["adapter"]) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"the ranks' adapter has parameters this model lacks: {sorted(missing)[:3]}")
    model.load_state_dict(saved["adapter"], strict=False)
    return model, FinetuneResult(**saved["result"] | {"shards": sorted(shards, key=lambda s: s["rank"])})


def merge(model: PeftModel, hf_dir: Path, out: Path) -> Path:
    """The adapter folded into the base weights: a plain Hugging Face folder (safetensors, tokenizer and
    generation files of the base)."""
    out = Path(out)
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    for f in Path(hf_dir).iterdir():
        if (
            f.is_file()
            and f.suffix != ".safetensors"
            and not f.name.endswith(".index.json")
            and not (out / f.name).exists()
        ):
            shutil.copyfile(f, out / f.name)
    return out
