"""`finetune train`: set up, then one readable loop.

The loss of an optimizer step is the mean over every response token in all of its
micro batches (on all processes), not the mean of per-batch means: each micro
batch's summed token loss is divided by the step's total token count before
backward. Padding-heavy or short batches therefore get no extra weight, and
gradient accumulation gives the same gradient as one big batch.

Resuming is exact: a checkpoint holds the adapter, optimizer, scheduler, RNG
states and the data position (epoch, micro batches consumed), and data order is
a pure function of (seed, epoch), so N steps + resume + N steps reproduces a
straight 2N-step run.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from finetune import records
from finetune.checkpoint import (
    find_resume_checkpoint, load_training_state, prepare_run_dir, prune_checkpoints, save_checkpoint, write_json,
)
from finetune.data import IGNORE, Collator, cache_dir, fingerprint, real_tokens, split_records, train_eval_split
from finetune.distributed import check_strategy
from finetune.errors import CheckpointError, NonFiniteLossError, TrainingInterrupted
from finetune.evaluate import GenerationOptions, eval_loss, generation_metrics, token_loss_sum
from finetune.model import attach_lora, load_base_model, load_tokenizer
from finetune.placement import resolve
from finetune.recipe import Recipe, TrainingSection


def train(recipe: Recipe, *, overwrite: bool = False, resume: str | None = None, console: Console | None = None) -> Path:
    """Fine-tune per the recipe; return the final checkpoint directory."""
    t = recipe.training
    console = console or Console(stderr=True)
    run_dir = recipe.run_dir
    placement = resolve(recipe.quantization)
    dtype = placement.compute_dtype
    records.check_trackers(t.report_to)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, torchrun on CPU would start N independent runs, not gloo DDP
        mixed_precision=placement.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        log_with=t.report_to or None,
        project_dir=str(run_dir),
    )
    main = accelerator.is_main_process
    check_strategy(recipe, placement)
    resume_from = find_resume_checkpoint(run_dir, resume) if resume else None
    if main and not resume_from:
        prepare_run_dir(run_dir, overwrite)
    set_seed(t.seed)

    tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template)
    train_set, eval_set, stats = train_eval_split(recipe.data, tokenizer, t.seed, cache_dir(run_dir))
    env = records.environment(accelerator.device, fingerprint(recipe.data, tokenizer))
    if resume_from:
        records.check_resume(resume_from, recipe, env, console if main else None)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, accelerator.device, placement), recipe)
    trainable, total_params = model.get_nb_trainable_parameters()
    collate = Collator(tokenizer.pad_token_id, padding_free=t.padding_free)
    # A private generator keeps data loading from consuming the global RNG (dropout's), for exact resume.
    train_dl = DataLoader(train_set, batch_size=t.micro_batch_size, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(t.seed))
    eval_dl = DataLoader(eval_set, batch_size=t.micro_batch_size, collate_fn=collate) if eval_set else None
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        from peft.utils.other import fsdp_auto_wrap_policy  # frozen and trainable weights in separate units

        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    optimizer = make_optimizer(model, t)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)

    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "best_eval_loss": None, "best_checkpoint": None,
             "skipped_steps": []}
    window = {"loss": 0.0, "tokens": 0, "seen": 0}
    rng_to_restore = None
    if resume_from:
        saved_state, saved = load_training_state(resume_from)
        state.update({k: saved_state.get(k, v) for k, v in state.items()})
        window.update(saved["window"])
        _load_adapter_weights(accelerator.unwrap_model(model), resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])
        rng_to_restore = _this_process_rng(saved["rng"], accelerator)
    if main:
        if resume_from:  # a crash may have logged steps after the checkpoint: they are about to be redone
            records.truncate_metrics(run_dir / "metrics.jsonl", state["step"])
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
        write_json(run_dir / "environment.json", env)
        accelerator.init_trackers(recipe.name or "finetune", config=records.tracker_config(recipe))
        console.print(
            f"[bold]{recipe.name}[/]: {stats.examples} train / {len(eval_set)} eval examples "
            f"({stats.truncated} truncated, {stats.dropped} dropped), {total_steps} steps, effective batch "
            f"{t.micro_batch_size} x {t.gradient_accumulation_steps} x {accelerator.num_processes} processes"
            + (f", resuming from {resume_from} at step {state['step']}" if resume_from else "")
            + f"\ntrainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / total_params:.3f}%), "
            f"compute dtype {str(dtype).removeprefix('torch.')}, device {accelerator.device}"
        )

    def log(record: dict) -> None:
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            progress.console.print(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()), highlight=False, soft_wrap=True)

    generation_records = []
    if t.eval_generate_steps and main:
        generation_records = [r for r in split_records(recipe.data, t.seed)[1] if r.fmt != "text"]
        generation_records = generation_records[: t.eval_generate_examples]

    def evaluate() -> dict:
        loss = eval_loss(model, eval_dl, accelerator)
        record = {"step": state["step"], "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
        log(record)
        return record

    def generation_eval() -> None:
        """exact_match / contains of greedy generations on the first eval examples, as `finetune eval` scores
        them. Main process only (the others wait); the RNG is forked so training randomness is unchanged."""
        if main and generation_records:
            options = GenerationOptions(max_new_tokens=t.eval_max_new_tokens, extractor=t.eval_extract,
                                        batch_size=t.micro_batch_size)
            with torch.random.fork_rng(devices=[]):
                metrics, _ = generation_metrics(accelerator.unwrap_model(model), tokenizer, generation_records, options)
            log({"step": state["step"], **{f"eval_{k}": v for k, v in metrics.items()}})
        accelerator.wait_for_everyone()

    def checkpoint(name: str, eval_record: dict | None = None) -> Path:
        accelerator.wait_for_everyone()
        path = run_dir / name
        if eval_record and (state["best_eval_loss"] is None or eval_record["eval_loss"] < state["best_eval_loss"]):
            state["best_eval_loss"], state["best_checkpoint"] = eval_record["eval_loss"], str(path)
        # Sharded (FSDP/ZeRO-3) weights are gathered by every process; DDP replicas are whole already.
        state_dict = accelerator.get_state_dict(model) if placement.shards_parameters else None
        rng = gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]  # one per process
        if main:
            training_state = {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng, "window": window,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            }
            files = {
                "recipe.yaml": recipe.to_yaml(), "environment.json": env,
                "trainer_state.json": {
                    **state, "total_steps": total_steps, "recipe": recipe.name,
                    "epochs_done": round(state["epoch"] + state["micro_in_epoch"] / len(train_dl), 4),
                },
            }
            save_checkpoint(path, accelerator.unwrap_model(model), tokenizer, files, training_state, state_dict)
            if t.save_total_limit and name != "checkpoint-final":
                best = Path(state["best_checkpoint"]) if t.keep_best and state["best_checkpoint"] else None
                prune_checkpoints(run_dir, t.save_total_limit, protect=best)
        accelerator.wait_for_everyone()
        return path

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not main,
    )
    task = progress.add_task("train", total=total_steps, completed=state["step"], info="")
    model.train()
    started = time.perf_counter()
    window_start = time.perf_counter()
    stop = _StopOnSignal()
    with progress, stop:
        while state["step"] < total_steps:
            train_dl.set_epoch(state["epoch"])
            for group in _groups(train_dl, t.gradient_accumulation_steps, skip=state["micro_in_epoch"]):
                if rng_to_restore is not None:  # after the data iterator exists: exactly where the run stopped
                    _set_rng_state(rng_to_restore)
                    rng_to_restore = None
                n_tokens = int(accelerator.reduce(
                    torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group), device=accelerator.device),
                    "sum",
                ))
                step_loss = torch.zeros((), device=accelerator.device)
                for i, batch in enumerate(group):
                    with nullcontext() if i == len(group) - 1 else accelerator.no_sync(model):
                        loss_sum = token_loss_sum(model, batch)
                        accelerator.backward(loss_sum * accelerator.num_processes / max(n_tokens, 1))
                    step_loss += loss_sum.detach()
                    window["seen"] += real_tokens(batch)  # not padding, packed or not
                step_loss = accelerator.reduce(step_loss, "sum").item() / max(n_tokens, 1)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
                state["micro_in_epoch"] += len(group)
                state["step"] += 1
                # Under fp16 an inf gradient with a finite loss is routine: the grad scaler skips that step itself
                # and lowers its scale. Anything else non-finite is the run diverging (or bad data).
                scaled = accelerator.scaler is not None
                finite = math.isfinite(step_loss) and (bool(torch.isfinite(grad_norm)) or scaled)
                if not finite:
                    if t.nan_policy == "stop":
                        raise NonFiniteLossError(
                            f"Step {state['step']}: the loss ({step_loss}) or gradient norm ({float(grad_norm)}) is not "
                            f"finite; training stopped before applying it. Checkpoints in {run_dir} are intact. Lower "
                            f"training.learning_rate, check the data, or set training.nan_policy=skip_step."
                        )
                    log({"step": state["step"], "skipped": "non-finite loss or gradient"})
                    state["skipped_steps"].append(state["step"])
                else:
                    optimizer.step()
                    window["loss"] += step_loss * n_tokens
                    window["tokens"] += n_tokens
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step = state["step"]
                if finite and (step % t.logging_steps == 0 or step == total_steps):  # a skipped step has no loss
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step, "epoch": state["epoch"], "loss": window["loss"] / max(window["tokens"], 1),
                        "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "tokens_per_s": window["seen"] * accelerator.num_processes / elapsed,
                        "memory_gib": records.peak_memory_gib(accelerator.device),
                    }
                    log(record)
                    progress.update(task, info=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                                               f"{record['tokens_per_s']:,.0f} tok/s")
                    window.update(loss=0.0, tokens=0, seen=0)
                    window_start = time.perf_counter()
                progress.update(task, completed=step)
                if step < total_steps:
                    last_eval = evaluate() if eval_dl is not None and t.eval_steps and step % t.eval_steps == 0 else None
                    if t.eval_generate_steps and step % t.eval_generate_steps == 0:
                        generation_eval()
                    saved = t.save_steps and step % t.save_steps == 0
                    if saved:
                        checkpoint(f"checkpoint-{step}", last_eval)
                    signum = _agreed_signal(accelerator, stop.signum)
                    if signum:
                        path = run_dir / f"checkpoint-{step}" if saved else checkpoint(f"checkpoint-{step}")
                        raise TrainingInterrupted(
                            f"Stopped by {signal.Signals(signum).name} after step {step}; checkpoint written to "
                            f"{path}. Resume with: finetune train <recipe> --resume",
                            exit_code=128 + signum,
                        )
                if step >= total_steps:
                    break
            else:
                state["epoch"] += 1
                state["micro_in_epoch"] = 0

    with stop:  # a first Ctrl-C now lets the run finish: that is what it is about to do, and nothing is lost
        last_eval = evaluate() if eval_dl is not None else None
        if t.eval_generate_steps:
            generation_eval()
        final = checkpoint("checkpoint-final", last_eval)
    if main:
        summary = {
            "steps": state["step"],
            "train_examples": stats.examples,
            "wall_time_s": round(time.perf_counter() - started, 2),
            "eval_loss": last_eval and last_eval["eval_loss"],
            "best_eval_loss": state["best_eval_loss"],
            "best_checkpoint": state["best_checkpoint"],
            "skipped_steps": state["skipped_steps"],
            "final_checkpoint": str(final),
            "peak_memory_gib": records.peak_memory_gib(accelerator.device),
        }
        records.plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        write_json(run_dir / "summary.json", summary)
        accelerator.end_training()
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


def _groups(dataloader, size: int, skip: int = 0):
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


def _load_adapter_weights(model, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))


def _this_process_rng(saved: list | dict, accelerator: Accelerator) -> dict:
    """Each process resumes with its own RNG streams (dropout masks differ per process)."""
    if isinstance(saved, dict):  # checkpoints written before per-process RNG states
        return saved
    if len(saved) != accelerator.num_processes:
        raise CheckpointError(
            f"The checkpoint was written by {len(saved)} processes, this run has {accelerator.num_processes}: "
            f"resuming would change the data order and dropout. Launch {len(saved)} processes to resume it."
        )
    return saved[accelerator.process_index]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _agreed_signal(accelerator: Accelerator, signum: int) -> int:
    """The signal any process received, so that all stop after the same step (a launcher may signal only some;
    a process that stopped alone would leave the others waiting in the next collective forever)."""
    if accelerator.num_processes == 1:
        return signum
    return int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "max"))


class _StopOnSignal:
    """First SIGINT/SIGTERM: remember it (the loop checkpoints and stops after the current step).
    Second: stop at once; checkpoints are written atomically, so the last complete one stays intact."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
