"""`finetune train`: `setup` (everything from the recipe), then `fit` (one readable loop), then `finish`.

Where things live: the loss of a micro batch is the recipe's objective (objectives.py; SFT's
token loss without wasted logits is loss.py), the data comes tokenized from finetune/data/, the
model from model.py with its precision and placement resolved once (placement.py), and
checkpoints, resume state and RNG streams are written and read by checkpoint.py.

A step's loss is the mean over every unit (response token for SFT, pair for DPO) of all its micro
batches on all processes: each micro batch's summed loss is divided by the step's unit count before
backward, so gradient accumulation gives the same gradient as one big batch.

Resuming is exact: a checkpoint holds adapter, optimizer, scheduler, RNG states and data position (`LoopState`);
data order is a function of (seed, epoch): N steps + resume + N steps = 2N steps.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from finetune import checkpoint as ckpt, lock, records
from finetune.attention import use_segmented_attention
from finetune.data import Collator, PairCollator, Pairs, cache_dir, fingerprint, real_tokens, split_records, train_eval_split
from finetune.distributed import check_strategy
from finetune.errors import NonFiniteLossError, TrainingInterrupted
from finetune.evaluate import eval_objective
from finetune.generation import GenerationOptions, generation_metrics
from finetune.interrupt import StopOnSignal, agreed_signal
from finetune.model import attach_lora, load_base_model, load_tokenizer, make_optimizer
from finetune.objectives import Objective, make_objective
from finetune.placement import Placement, dtype_name, resolve
from finetune.recipe import Recipe
from finetune.records import MetricsLog


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

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(recipe: Recipe, *, overwrite: bool = False, resume: str | None = None, console: Console | None = None) -> Path:
    """Fine-tune per the recipe; return the final checkpoint directory."""
    console = console or Console(stderr=True)
    # One train per run directory, locked before anything in it is touched (main process only; lock.py).
    with lock.hold(recipe.run_dir, "finetune train") if lock.is_main_process() else nullcontext():
        run, rng_to_restore = setup(recipe, console, overwrite=overwrite, resume=resume)
        started = time.perf_counter()
        progress = _progress(console, run)
        stop = StopOnSignal()
        with progress, stop:
            fit(run, progress, stop, rng_to_restore)
        with stop:  # a first Ctrl-C now lets the run finish: that is what it is about to do, and nothing is lost
            return finish(run, started)


# ---------------------------------------------------------------------------------------------- set-up


def setup(recipe: Recipe, console: Console, *, overwrite: bool, resume: str | None) -> tuple[Run, dict | None]:
    """Recipe -> data -> model -> optimizer, restored from a checkpoint when resuming.
    Returns the run and the RNG state to restore once the data iterator exists (None for a fresh run)."""
    t = recipe.training
    placement = resolve(recipe.quantization)
    records.check_trackers(t.report_to)
    accelerator = _accelerator(recipe, placement)
    check_strategy(recipe, placement)
    objective = make_objective(recipe)  # before anything heavy: e.g. a GRPO reward module that does not import
    resume_from = ckpt.find_resume_checkpoint(recipe.run_dir, resume) if resume else None
    if accelerator.is_main_process and not resume_from:
        ckpt.prepare_run_dir(recipe.run_dir, overwrite)
    set_seed(t.seed)

    tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template)
    train_set, eval_set, stats = train_eval_split(recipe.data, tokenizer, t.seed, cache_dir(recipe.run_dir))
    env = records.environment(accelerator.device, fingerprint(recipe.data, tokenizer))
    if resume_from:
        records.check_resume(resume_from, recipe, env, console if accelerator.is_main_process else None)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, accelerator.device, placement), recipe)
    if recipe.data.packing or t.padding_free:
        use_segmented_attention(model)  # each example of a row attends to itself only, at its own cost
    collate = Collator(tokenizer.pad_token_id, padding_free=t.padding_free)
    collate = PairCollator(collate) if isinstance(train_set, Pairs) else collate  # a pair's two sides together
    objective.prepare(model, train_set, eval_set, collate, t.micro_batch_size)  # e.g. DPO's precomputed reference
    # A private generator keeps data loading from consuming the global RNG (dropout's), for exact resume.
    train_dl = DataLoader(train_set, batch_size=t.micro_batch_size, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(t.seed))
    eval_dl = DataLoader(eval_set, batch_size=t.micro_batch_size, collate_fn=collate) if eval_set else None
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        from peft.utils.other import fsdp_auto_wrap_policy  # frozen and trainable weights in separate units

        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    optimizer = make_optimizer(model, t)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    eval_dl = accelerator.prepare(eval_dl) if eval_dl is not None else None
    total_steps = t.max_steps or t.epochs * math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    run = Run(recipe, accelerator, placement, tokenizer, model, objective, optimizer, scheduler,
              train_dl, eval_dl, total_steps, env, MetricsLog(recipe.run_dir / "metrics.jsonl", accelerator, console),
              stats.examples // 2 if isinstance(train_set, Pairs) else stats.examples)  # pairs count once
    if _initial_adapter(recipe):  # PiSSA/OLoRA: B0 A0 written before training, checked when resuming
        ckpt.keep_initial_adapter(accelerator.unwrap_model(model), _initial_adapter(recipe), bool(resume_from), run.main)
    rng = _restore(run, resume_from) if resume_from else None
    if t.eval_generate_steps and run.main:
        prompted = [r for r in split_records(recipe.data, t.seed)[1] if r.fmt in ("alpaca", "chat", "completion")]
        run.generation_records = prompted[: t.eval_generate_examples]
    if run.main:
        _start_records(run, resume_from)
        console.print(_banner(run, len(eval_set), stats, resume_from))
    return run, rng


def _initial_adapter(recipe: Recipe) -> Path | None:
    """Where a PiSSA/OLoRA run keeps its adapter as initialised (what checkpoints are converted against)."""
    return recipe.run_dir / "initial_adapter" if recipe.lora.init.startswith(("pissa", "olora")) else None


def _accelerator(recipe: Recipe, placement: Placement) -> Accelerator:
    t = recipe.training
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, torchrun on CPU would start N independent runs, not gloo DDP
        mixed_precision=placement.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        log_with=t.report_to or None,
        project_dir=str(recipe.run_dir),
    )


def _restore(run: Run, path: Path) -> dict:
    """Load a checkpoint's adapter, optimizer, scheduler, loop state and window; return this process's RNG state."""
    trainer_state, saved = ckpt.load_training_state(path)
    run.state = LoopState(**{k: trainer_state[k] for k in asdict(LoopState()) if k in trainer_state})
    window = dict(saved["window"])
    window.setdefault("units", window.pop("tokens", 0))  # checkpoints written before objectives
    run.window = Window(**window)
    ckpt.load_adapter_weights(run.accelerator.unwrap_model(run.model), path)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.accelerator.scaler is not None and saved.get("scaler"):
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    acc = run.accelerator
    rng = ckpt.this_process_rng(saved["rng"], acc.num_processes, acc.process_index)  # checks the process count
    run.objective.load_state_dict(saved.get("objective", [{}] * acc.num_processes)[acc.process_index])
    return rng


def _start_records(run: Run, resume_from: Path | None) -> None:
    run_dir = run.recipe.run_dir
    if resume_from:  # a crash may have logged steps after the checkpoint: they are about to be redone
        records.truncate_metrics(run_dir / "metrics.jsonl", run.state.step)
    (run_dir / "recipe.yaml").write_text(run.recipe.to_yaml())
    ckpt.write_json(run_dir / "environment.json", run.env)
    run.accelerator.init_trackers(run.recipe.name or "finetune", config=records.tracker_config(run.recipe))


def _banner(run: Run, n_eval: int, stats, resume_from: Path | None) -> str:
    t, acc = run.recipe.training, run.accelerator
    trainable, total = acc.unwrap_model(run.model).get_nb_trainable_parameters()
    return (
        f"[bold]{run.recipe.name}[/]: {run.train_examples} train / {n_eval} eval "
        f"{'pairs' if run.objective.unit == 'pair' else 'examples'} "
        f"({stats.truncated} truncated, {stats.dropped} dropped), {run.total_steps} steps, effective batch "
        f"{t.micro_batch_size} x {t.gradient_accumulation_steps} x {acc.num_processes} processes"
        + (f", resuming from {resume_from} at step {run.state.step}" if resume_from else "")
        + f"\ntrainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), "
        f"objective {t.objective}, compute dtype {dtype_name(run.placement.compute_dtype)}, device {acc.device}"
    )


# ---------------------------------------------------------------------------------------------- the loop


def fit(run: Run, progress: Progress, stop: StopOnSignal, rng_to_restore: dict | None) -> None:
    """Optimizer steps until `total_steps`: each one a group of micro batches, then logging, eval, saving."""
    t, state = run.recipe.training, run.state
    task = progress.add_task("train", total=run.total_steps, completed=state.step, info="")
    run.model.train()
    window_start = time.perf_counter()
    while state.step < run.total_steps:
        run.train_dl.set_epoch(state.epoch)
        for group in _groups(run.train_dl, t.gradient_accumulation_steps, skip=state.micro_in_epoch):
            if rng_to_restore is not None:  # after the data iterator exists: exactly where the run stopped
                ckpt.set_rng_state(rng_to_restore)
                rng_to_restore = None
            result = train_step(run, group)
            state.micro_in_epoch += len(group)
            state.step += 1
            if not result.finite:
                _non_finite(run, result)
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


def train_step(run: Run, group: list[dict]) -> StepResult:
    """Forward and backward every micro batch of one optimizer step, then clip and (if finite) step."""
    acc, objective, t = run.accelerator, run.objective, run.recipe.training
    group = objective.rollout(run, group)  # GRPO: prompts -> sampled, scored answers; others: unchanged
    units = int(acc.reduce(torch.tensor(sum(objective.units(b) for b in group), device=acc.device), "sum"))
    loss = torch.zeros(1 + len(objective.metrics), device=acc.device)  # the loss, then the objective's metrics
    seen = 0
    for i, batch in enumerate(group):
        with nullcontext() if i == len(group) - 1 else acc.no_sync(run.model):
            out = objective(run.model, batch)
            acc.backward(out.total * acc.num_processes / max(units, 1))
        loss += torch.stack([out.total.detach(), *(out.metrics[k] for k in objective.metrics)]).to(loss)
        seen += real_tokens(batch)  # not padding, packed or not
    sums = acc.reduce(loss, "sum").tolist()
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm or float("inf"))
    step_loss = sums[0] / max(units, 1)
    # Under fp16 an inf gradient with a finite loss is routine: the grad scaler skips that step itself
    # and lowers its scale. Anything else non-finite is the run diverging (or bad data).
    finite = math.isfinite(step_loss) and (bool(torch.isfinite(grad_norm)) or acc.scaler is not None)
    if finite:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, units, float(grad_norm), seen, dict(zip(objective.metrics, sums[1:])), finite)


def _non_finite(run: Run, result: StepResult) -> None:
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


def periodic(run: Run, stop: StopOnSignal) -> None:
    """After a step that is not the last: eval, generation metrics and checkpoint when due; stop on a signal."""
    t, step = run.recipe.training, run.state.step
    last_eval = evaluate(run) if run.eval_dl is not None and t.eval_steps and step % t.eval_steps == 0 else None
    if t.eval_generate_steps and step % t.eval_generate_steps == 0:
        generation_eval(run)
    saved = bool(t.save_steps and step % t.save_steps == 0)
    if saved:
        save(run, f"checkpoint-{step}", last_eval)
    signum = agreed_signal(run.accelerator, stop.signum)
    if signum:
        path = run.recipe.run_dir / f"checkpoint-{step}" if saved else save(run, f"checkpoint-{step}")
        raise TrainingInterrupted(
            f"Stopped by {signal.Signals(signum).name} after step {step}; checkpoint written to "
            f"{path}. Resume with: finetune train <recipe> --resume",
            exit_code=128 + signum,
        )


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


# ------------------------------------------------------------------------------- evaluation, saving, end


def evaluate(run: Run) -> dict:
    """The objective's loss and metrics on the eval data (all processes), logged as eval_*."""
    out = eval_objective(run.model, run.eval_dl, run.objective, run.accelerator)
    record = {"step": run.state.step, "eval_loss": out["loss"], **{f"eval_{k}": v for k, v in out.items() if k != "loss"}}
    if run.objective.unit == "token":  # perplexity is a per-token quantity
        record["eval_ppl"] = math.exp(min(out["loss"], 50))
    run.log.write(record)
    return record


def generation_eval(run: Run) -> None:
    """exact_match / contains of greedy generations on the first eval examples, as `finetune eval` scores
    them. Main process only (the others wait); the RNG is forked so training randomness is unchanged."""
    t = run.recipe.training
    if run.main and run.generation_records:
        options = GenerationOptions(max_new_tokens=t.eval_max_new_tokens, extractor=t.eval_extract,
                                    batch_size=t.micro_batch_size)
        with torch.random.fork_rng(devices=[]):
            model = run.accelerator.unwrap_model(run.model)
            metrics, _ = generation_metrics(model, run.tokenizer, run.generation_records, options)
        run.log.write({"step": run.state.step, **{f"eval_{k}": v for k, v in metrics.items()}})
    run.accelerator.wait_for_everyone()


def save(run: Run, name: str, eval_record: dict | None = None) -> Path:
    """Write checkpoint `name` (all processes take part; the main one writes) and prune old ones."""
    acc, state, t = run.accelerator, run.state, run.recipe.training
    acc.wait_for_everyone()
    path = run.recipe.run_dir / name
    if eval_record and (state.best_eval_loss is None or eval_record["eval_loss"] < state.best_eval_loss):
        state.best_eval_loss, state.best_checkpoint = eval_record["eval_loss"], str(path)
    # Sharded (FSDP/ZeRO-3) weights are gathered by every process; DDP replicas are whole already.
    state_dict = acc.get_state_dict(run.model) if run.placement.shards_parameters else None
    rng = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]  # one per process
    objective = [run.objective.state_dict()]  # e.g. GRPO's generation batch being reused, one per process
    objective = gather_object(objective) if acc.num_processes > 1 else objective
    if run.main:
        training_state = {
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "rng": rng, "window": asdict(run.window), "objective": objective,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        trainer_state = {**asdict(state), "total_steps": run.total_steps, "recipe": run.recipe.name,
                         "epochs_done": round(state.epoch + state.micro_in_epoch / len(run.train_dl), 4)}
        files = {"recipe.yaml": run.recipe.to_yaml(), "environment.json": run.env, "trainer_state.json": trainer_state,
                 "adapter_base.json": records.adapter_base(run.recipe)}
        ckpt.save_checkpoint(path, acc.unwrap_model(run.model), run.tokenizer, files, training_state, state_dict,
                             initial_adapter=_initial_adapter(run.recipe))
        if t.save_total_limit and name != "checkpoint-final":
            best = Path(state.best_checkpoint) if t.keep_best and state.best_checkpoint else None
            ckpt.prune_checkpoints(run.recipe.run_dir, t.save_total_limit, protect=best)
    acc.wait_for_everyone()
    return path


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
        run.accelerator.end_training()
        run.log.console.print(f"done in {summary['wall_time_s']:.1f}s; adapter written to [bold]{final}[/]")
    return final


def _progress(console: Console, run: Run) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not run.main,
    )
