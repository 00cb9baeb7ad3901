"""What a training run is while it runs: everything `setup` builds (`Run`), where the loop is (`LoopState`), the
sums since the last metrics line (`Window`) and one optimizer step's outcome (`StepResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from finetune.model import MethodRuntime, Placement
from finetune.objectives import Objective
from finetune.recipe import Recipe
from finetune.train.records import MetricsLog


@dataclass
class LoopState:
    """Where training is. Saved in every checkpoint (trainer_state.json) and restored on resume."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro batches of this epoch already trained
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None
    skipped_steps: list[int] = field(default_factory=list)



@dataclass
class Window:
    """Sums since the last metrics line (saved with a checkpoint, so a resumed run logs the same lines)."""

    loss: float = 0.0  # summed over units
    units: int = 0
    seen: int = 0  # real (non-padding) tokens processed, for tokens/s
    steps: int = 0  # optimizer steps, for the time per step
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, summed over units

    def add(self, step: "StepResult") -> None:
        self.loss += step.loss * step.units
        self.units += step.units
        for k, v in step.metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v



@dataclass
class StepResult:
    loss: float  # mean over the step's units on all processes
    units: int
    grad_norm: float
    seen: int  # real tokens of this process
    metrics: dict[str, float]  # summed over units on all processes
    finite: bool



@dataclass
class Run:
    """Everything `setup` builds and the loop pieces read: passed explicitly, never captured."""

    recipe: Recipe
    accelerator: Accelerator
    placement: Placement
    tokenizer: object
    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_dl: DataLoader
    eval_dl: DataLoader | None
    total_steps: int
    env: dict
    log: MetricsLog
    train_examples: int  # before packing
    state: LoopState = field(default_factory=LoopState)
    window: Window = field(default_factory=Window)
    generation_records: list = field(default_factory=list)
    method: MethodRuntime = field(default_factory=MethodRuntime)  # AdaLoRA's allocator; no-op otherwise

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process
