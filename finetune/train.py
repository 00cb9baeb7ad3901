"""`finetune train`: set up, then one readable loop.

The loss of an optimizer step is the mean over every response token in all of its
micro batches (on all processes), not the mean of per-batch means: each micro
batch's summed token loss is divided by the step's total token count before
backward. Padding-heavy or short batches therefore do not get extra weight, and
gradient accumulation gives the same gradient as one big batch.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from finetune.checkpoint import prepare_run_dir, save_checkpoint, write_json
from finetune.data import Collator, train_eval_split
from finetune.errors import NonFiniteLossError
from finetune.evaluate import eval_loss, token_loss_sum
from finetune.model import attach_lora, load_base_model, load_tokenizer, resolve_compute_dtype
from finetune.recipe import Recipe, TrainingSection


def train(recipe: Recipe, *, overwrite: bool = False, console: Console | None = None) -> Path:
    """Fine-tune per the recipe; return the final checkpoint directory."""
    t = recipe.training
    console = console or Console(stderr=True)
    run_dir = recipe.run_dir
    dtype = resolve_compute_dtype(recipe.quantization.compute_dtype)
    accelerator = Accelerator(
        mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no"),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    main = accelerator.is_main_process
    if main:
        prepare_run_dir(run_dir, overwrite)
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    set_seed(t.seed)

    tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template)
    train_set, eval_set, stats = train_eval_split(recipe.data, tokenizer, t.seed)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, accelerator.device), recipe)
    trainable, total_params = model.get_nb_trainable_parameters()
    collate = Collator(tokenizer.pad_token_id)
    train_dl = DataLoader(train_set, batch_size=t.micro_batch_size, shuffle=True, collate_fn=collate)
    eval_dl = DataLoader(eval_set, batch_size=t.micro_batch_size, collate_fn=collate) if eval_set else None
    optimizer = make_optimizer(model, t)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)

    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    if main:
        console.print(
            f"[bold]{recipe.name}[/]: {stats.examples} train / {len(eval_set)} eval examples "
            f"({stats.truncated} truncated, {stats.dropped} dropped), {total_steps} steps, effective batch "
            f"{t.micro_batch_size} x {t.gradient_accumulation_steps} x {accelerator.num_processes} processes\n"
            f"trainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / total_params:.3f}%), "
            f"compute dtype {str(dtype).removeprefix('torch.')}, device {accelerator.device}"
        )

    def evaluate(step: int) -> dict:
        loss = eval_loss(model, eval_dl, accelerator)
        model.train()
        record = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
        log(record)
        return record

    def log(record: dict) -> None:
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.console.print(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def checkpoint(name: str, step: int, epoch: int) -> Path:
        accelerator.wait_for_everyone()
        path = run_dir / name
        if main:
            state = {"step": step, "epoch": epoch, "total_steps": total_steps, "recipe": recipe.name}
            save_checkpoint(path, accelerator.unwrap_model(model), tokenizer, recipe.to_yaml(), state)
        accelerator.wait_for_everyone()
        return path

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not main, transient=False,
    )
    task = progress.add_task("train", total=total_steps, info="")
    model.train()
    step, epoch, started = 0, 0, time.perf_counter()
    window = {"loss": 0.0, "tokens": 0, "seen": 0, "t0": time.perf_counter()}
    last_eval = None
    with progress:
        while step < total_steps:
            train_dl.set_epoch(epoch)
            for group in _groups(train_dl, t.gradient_accumulation_steps):
                n_tokens = accelerator.reduce(
                    torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in group), device=accelerator.device),
                    "sum",
                ).item()
                step_loss = 0.0
                for i, batch in enumerate(group):
                    sync = i == len(group) - 1
                    with nullcontext() if sync else accelerator.no_sync(model):
                        loss_sum = token_loss_sum(model, batch)
                        accelerator.backward(loss_sum * accelerator.num_processes / max(n_tokens, 1))
                    step_loss += loss_sum.detach()
                    window["seen"] += int(batch["attention_mask"].sum())
                step_loss = accelerator.reduce(step_loss, "sum").item() / max(n_tokens, 1)
                grad_norm = (
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
                )
                if not math.isfinite(step_loss) or (grad_norm is not None and not torch.isfinite(grad_norm)):
                    raise NonFiniteLossError(
                        f"Step {step + 1}: the loss ({step_loss}) or gradient norm is not finite, so training "
                        f"stopped before the optimizer applied it. Checkpoints written so far in {run_dir} are "
                        f"intact. Lower training.learning_rate or check the data."
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window["loss"] += step_loss * n_tokens
                window["tokens"] += n_tokens
                if step % t.logging_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window["t0"]
                    tok_s = window["seen"] * accelerator.num_processes / elapsed
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "loss": window["loss"] / max(window["tokens"], 1),
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": tok_s,
                    }
                    log(record)
                    progress.update(task, info=f"loss {record['loss']:.4f} lr {record['lr']:.2e} {tok_s:,.0f} tok/s")
                    window = {"loss": 0.0, "tokens": 0, "seen": 0, "t0": time.perf_counter()}
                progress.update(task, completed=step)
                if eval_dl is not None and t.eval_steps and step % t.eval_steps == 0 and step < total_steps:
                    last_eval = evaluate(step)
                if t.save_steps and step % t.save_steps == 0 and step < total_steps:
                    checkpoint(f"checkpoint-{step}", step, epoch)
                if step >= total_steps:
                    break
            epoch += 1

    if eval_dl is not None:
        last_eval = evaluate(step)
    final = checkpoint("checkpoint-final", step, epoch)
    if main:
        summary = {
            "steps": step,
            "train_examples": stats.examples,
            "wall_time_s": round(time.perf_counter() - started, 2),
            "eval_loss": last_eval and last_eval["eval_loss"],
            "final_checkpoint": str(final),
        }
        write_json(run_dir / "summary.json", summary)
        console.print(f"done in {summary['wall_time_s']:.1f}s; adapter written to [bold]{final}[/]")
    return final


def make_optimizer(model, t: TrainingSection) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters; paged variants page state to CPU under GPU memory pressure."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    cls = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_torch": torch.optim.AdamW,
    }[t.optimizer]
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _groups(dataloader, size: int):
    """Micro batches grouped per optimizer step (the last group of an epoch may be shorter)."""
    group = []
    for batch in dataloader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
