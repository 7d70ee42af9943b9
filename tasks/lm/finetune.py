"""The `finetune:` section of a causal-LM config: LoRA fine-tuning of the model on the corpus before it is
exported and compressed (the stage is `tasks/lm/lora.py`; its Optuna search is configured here too).

Light on purpose (pydantic only): `tasks/config.py` assembles the pipeline config from it and must load
without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.core.settings import Section

Target = Literal["attention", "attention+mlp"]
Parallel = Literal["ddp", "fsdp"]


class FinetuneSearchConfig(Section):
    """Optuna over the LoRA settings, scored on validation perplexity (the best trial's settings are trained)."""

    n_trials: int = Field(0, ge=0, description="Trials (0: train the settings of `finetune` as they are).")
    seed: int = Field(0, description="Sampler seed.")
    ranks: list[int] = Field([4, 8, 16], min_length=1, description="LoRA ranks to try.")
    alpha_ratios: list[float] = Field([1.0, 2.0], min_length=1, description="LoRA alpha as a multiple of the rank.")
    lr: tuple[float, float] = Field((1e-4, 2e-3), description="Learning-rate range (log scale).")
    epochs: list[int] = Field(
        [1, 2, 3], min_length=1, description="Epoch budgets to try (early stopping still applies)."
    )
    targets: list[Target] = Field(
        ["attention", "attention+mlp"], min_length=1, description="Target module sets to try."
    )
    warmup: list[float] = Field([0.0, 0.1], min_length=1, description="Warm-up fractions to try.")


class FinetuneConfig(Section):
    """LoRA (through peft) on the corpus's training documents: next-token loss on packed windows, early stopping
    on validation perplexity; the adapter is logged and merged into the base weights before export."""

    enabled: bool = Field(False, description="Fine-tune the model on the corpus before compressing it.")
    rank: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target: Target = Field(
        "attention", description="Adapted projections: attention (q/k/v/o) or attention+mlp (also gate/up/down)."
    )
    modules: list[str] = Field(
        [],
        description="Linear layer names to adapt instead of `target` (e.g. [q_proj, "
        "v_proj]); each must exist in the model.",
    )
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (AdamW).")
    epochs: int = Field(2, ge=1, description="Most passes over the training windows.")
    warmup: float = Field(
        0.1, ge=0, lt=1, description="Share of the steps with a linear warm-up; then cosine decay to a tenth."
    )
    window: int = Field(256, ge=8, description="Tokens per packed training and validation window.")
    batch_size: int = Field(8, ge=1, description="Windows per optimizer step (over all processes).")
    max_windows: int | None = Field(None, ge=1, description="Most training windows per epoch (bounds CPU time).")
    val_windows: int = Field(16, ge=1, description="Most validation windows scored after each epoch.")
    patience: int = Field(1, ge=1, description="Epochs without a better validation perplexity before stopping.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    processes: int = Field(
        1, ge=1, description="Training processes on this machine (torchrun across machines: see the README)."
    )
    parallel: Parallel = Field(
        "ddp",
        description="With processes > 1: ddp (every rank holds the whole model) or "
        "fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state split over the ranks).",
    )
    seed: int = Field(0, description="Seed of the adapter's initialisation and the window order.")
    search: FinetuneSearchConfig = Field(default_factory=FinetuneSearchConfig, description="The LoRA search.")

    @model_validator(mode="after")
    def _batch_splits(self) -> FinetuneConfig:
        if self.batch_size % self.processes:
            raise ValueError(
                f"finetune.batch_size ({self.batch_size}) must be a multiple of finetune.processes "
                f"({self.processes}): every rank takes an equal share of each step"
            )
        return self
