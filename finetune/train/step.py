"""One optimizer step: forward and backward of its micro batches, clipping, the NaN policy, the metrics line."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from finetune.data import real_tokens
from finetune.errors import NonFiniteLossError
from finetune.train import records
from finetune.train.run import Run, StepResult, Window


def train_step(run: Run, group: list[dict]) -> StepResult:
    """Forward and backward every micro batch of one optimizer step, then clip and (if finite) step."""
    acc, objective, t = run.accelerator, run.objective, run.recipe.training
    group = objective.rollout(run, group)  # GRPO: prompts -> sampled, scored answers; others: unchanged
    units = int(acc.reduce(torch.tensor(sum(objective.units(b) for b in group), device=acc.device), "sum"))
    # the loss, the objective's metrics, then a mixture of experts' load-balancing loss (moe.py), each summed over units
    metrics = list(objective.metrics) + (["aux_loss"] if run.method.router_coef > 0 else [])
    loss = torch.zeros(1 + len(metrics), device=acc.device)
    seen, penalty = 0, run.method.penalty()  # AdaLoRA's orthogonality term: once per step, not logged as loss
    for i, batch in enumerate(group):
        with nullcontext() if i == len(group) - 1 else acc.no_sync(run.model):
            out = objective(run.model, batch)
            extra = penalty * max(units, 1) / acc.num_processes if i == 0 and penalty is not None else 0
            if (aux := run.method.router_loss()) is not None:  # weighted by the batch's units: the step's mean
                out.metrics["aux_loss"] = aux.detach() * objective.units(batch)
                extra = extra + run.method.router_coef * aux * objective.units(batch)
            acc.backward((out.total + extra) * acc.num_processes / max(units, 1))
        loss += torch.stack([out.total.detach(), *(out.metrics.get(k, torch.zeros(())) for k in metrics)]).to(loss)
        seen += real_tokens(batch)  # not padding, packed or not
    sums = acc.reduce(loss, "sum").tolist()
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm or float("inf"))
    step_loss = sums[0] / max(units, 1)
    # Under fp16 an inf gradient with a finite loss is routine: the grad scaler skips that step itself
    # and lowers its scale. Anything else non-finite is the run diverging (or bad data).
    finite = math.isfinite(step_loss) and (bool(torch.isfinite(grad_norm)) or acc.scaler is not None)
    if finite:
        run.optimizer.step()
        run.method.after_step(run.state.step + 1)  # AdaLoRA: importance and rank re-allocation, gradients intact
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, units, float(grad_norm), seen, dict(zip(metrics, sums[1:])), finite)



def non_finite(run: Run, result: StepResult) -> None:
    """nan_policy: stop before the step is applied (checkpoints intact), or record it as skipped."""
    step = run.state.step
    if run.recipe.training.nan_policy == "stop":
        raise NonFiniteLossError(
            f"Step {step}: the loss ({result.loss}) or gradient norm ({result.grad_norm}) is not finite; training "
            f"stopped before applying it. Checkpoints in {run.recipe.run_dir} are intact. Lower "
            f"training.learning_rate, check the data, or set training.nan_policy=skip_step."
        )
    run.log.write({"step": step, "skipped": "non-finite loss or gradient"})
    run.state.skipped_steps.append(step)



def log_window(run: Run, result: StepResult, elapsed: float) -> str:
    """Write the metrics line for the steps since the last one; return the progress bar's text."""
    w, acc = run.window, run.accelerator
    record = {
        "step": run.state.step, "epoch": run.state.epoch, "loss": w.loss / max(w.units, 1),
        **{k: v / max(w.units, 1) for k, v in w.metrics.items()},
        "lr": run.scheduler.get_last_lr()[0], "grad_norm": result.grad_norm,
        "tokens_per_s": w.seen * acc.num_processes / elapsed, "step_s": elapsed / max(w.steps, 1),
        "memory_gib": records.peak_memory_gib(acc.device),
    }
    run.log.write(record)
    run.window = Window()
    return f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"



def groups(dataloader, size: int, skip: int = 0):
    """Micro batches grouped per optimizer step, after skipping `skip` already-trained ones.

    The last group of an epoch may be shorter. Skipped batches are still drawn, so the
    data order (a function of seed and epoch) is exactly that of an uninterrupted run.
    """
    group = []
    for i, batch in enumerate(dataloader):
        if i < skip:
            continue
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
