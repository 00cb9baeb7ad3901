"""`finetune train`: `setup` (everything from the recipe), then `fit` (one readable loop), then `finish`.

Where things live: `setup` is setup.py (the model from finetune/model/, its placement resolved once;
the data tokenized by finetune/data/); one optimizer step is step.py, against the recipe's objective
(finetune/objectives/); eval, generation metrics and checkpoints between steps are events.py; checkpoints,
resume state and RNG streams are written and read by checkpoint.py; what a run holds is run.py.

A step's loss is the mean over every unit (response token for SFT, pair for DPO) of all its micro
batches on all processes: each micro batch's summed loss is divided by the step's unit count before
backward, so gradient accumulation gives the same gradient as one big batch.

Resuming is exact: a checkpoint holds adapter, optimizer, scheduler, RNG states and data position (`LoopState`);
data order is a function of (seed, epoch): N steps + resume + N steps = 2N steps.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from finetune.artifacts import hold, is_main_process
from finetune.errors import OutOfMemory, first_line
from finetune.recipe import Recipe
from finetune.train import checkpoint as ckpt, records
from finetune.train.events import evaluate, generation_eval, periodic, save
from finetune.train.interrupt import StopOnSignal
from finetune.train.run import Run
from finetune.train.setup import setup
from finetune.train.step import groups, log_window, non_finite, train_step


def train(recipe: Recipe, *, overwrite: bool = False, resume: str | None = None, console: Console | None = None) -> Path:
    """Fine-tune per the recipe; return the final checkpoint directory."""
    console = console or Console(stderr=True)
    # One train per run directory, locked before anything in it is touched (main process only; artifacts/lock.py).
    with hold(recipe.run_dir, "finetune train") if is_main_process() else nullcontext():
        run, rng_to_restore = setup(recipe, console, overwrite=overwrite, resume=resume)
        started = time.perf_counter()
        progress = _progress(console, run)
        stop = StopOnSignal()
        with progress, stop:
            fit(run, progress, stop, rng_to_restore)
        with stop:  # a first Ctrl-C now lets the run finish: that is what it is about to do, and nothing is lost
            return finish(run, started)


def fit(run: Run, progress: Progress, stop: StopOnSignal, rng_to_restore: dict | None) -> None:
    """Optimizer steps until `total_steps`: each one a group of micro batches, then logging, eval, saving."""
    t, state = run.recipe.training, run.state
    task = progress.add_task("train", total=run.total_steps, completed=state.step, info="")
    run.model.train()
    window_start = time.perf_counter()
    while state.step < run.total_steps:
        run.train_dl.set_epoch(state.epoch)
        for group in groups(run.train_dl, t.gradient_accumulation_steps, skip=state.micro_in_epoch):
            if rng_to_restore is not None:  # after the data iterator exists: exactly where the run stopped
                ckpt.set_rng_state(rng_to_restore)
                rng_to_restore = None
            result = _step(run, group)
            state.micro_in_epoch += len(group)
            state.step += 1
            if not result.finite:
                non_finite(run, result)
            run.window.seen += result.seen
            run.window.steps += 1
            if result.finite:
                run.window.add(result)
            if result.finite and (state.step % t.logging_steps == 0 or state.step == run.total_steps):
                info = log_window(run, result, time.perf_counter() - window_start)  # a skipped step has no loss
                progress.update(task, info=info)
                window_start = time.perf_counter()
            progress.update(task, completed=state.step)
            if state.step < run.total_steps:
                periodic(run, stop)
            if state.step >= run.total_steps:
                break
        else:
            state.epoch += 1
            state.micro_in_epoch = 0


def _step(run: Run, group):
    """`train_step`, with running out of memory (CUDA's OutOfMemoryError; on CPU a MemoryError or the allocator's
    "can't allocate memory", e.g. under RLIMIT_AS) turned into OutOfMemory (exit 4) with what to change. Nothing is
    written after it: the checkpoints on disk are those of earlier steps, whole."""
    import torch

    try:
        return train_step(run, group)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        text = str(e)
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and not (
                "can't allocate memory" in text or "out of memory" in text.lower()):
            raise
        t, d = run.recipe.training, run.recipe.data
        raise OutOfMemory(
            f"Out of memory in training step {run.state.step + 1} ({type(e).__name__}: {first_line(e)[:160]}). "
            f"Lower training.micro_batch_size (now {t.micro_batch_size}; raise gradient_accumulation_steps to keep "
            f"the effective batch) or data.max_length (now {d.max_length}), or set training.gradient_checkpointing: "
            "true. The checkpoints already written are intact: `finetune train RECIPE --resume` continues from the "
            "newest."
        ) from None


# ------------------------------------------------------------------------------- evaluation, saving, end


def finish(run: Run, started: float) -> Path:
    """Final eval and checkpoint, then summary.json and the loss plot."""
    last_eval = evaluate(run) if run.eval_dl is not None else None
    if run.recipe.training.eval_generate_steps:
        generation_eval(run)
    final = save(run, "checkpoint-final", last_eval)
    if run.main:
        summary = {
            "steps": run.state.step,
            "train_examples": run.train_examples,
            "trainable_parameters": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            "wall_time_s": round(time.perf_counter() - started, 2),
            "eval_loss": last_eval and last_eval["eval_loss"],
            "best_eval_loss": run.state.best_eval_loss,
            "best_checkpoint": run.state.best_checkpoint,
            "skipped_steps": run.state.skipped_steps,
            "final_checkpoint": str(final),
            "peak_memory_gib": records.peak_memory_gib(run.accelerator.device),
        }
        records.plot_losses(run.recipe.run_dir / "metrics.jsonl", run.recipe.run_dir / "loss.png")
        ckpt.write_json(run.recipe.run_dir / "summary.json", summary)
        run.log.console.print(f"done in {summary['wall_time_s']:.1f}s; adapter written to [bold]{final}[/]")
    # every process: it destroys the process group (a process that kept its group could abort at exit, SIGABRT
    # from a thread still joinable, and torchrun then reports the finished run as failed)
    run.accelerator.end_training()
    if run.accelerator.num_processes > 1:
        # gloo's worker threads release each collective after it completes, which can drop the last reference to a
        # Python tensor and so takes the GIL; the group itself goes when the run is freed (DDP's reducer holds it),
        # and its destructor joins those threads holding the GIL. A worker that had not yet released the last
        # barrier then waited for the GIL forever (a rank hung after its run, now and then on a loaded CPU; seen
        # with gdb). Sleeping lets them finish with the GIL free.
        time.sleep(0.2)
    return final


def _progress(console: Console, run: Run) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not run.main,
    )
