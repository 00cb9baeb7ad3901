"""`setup`: recipe -> data -> model -> optimizer, restored from a checkpoint when resuming; placement resolved once."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from rich.console import Console
from torch.utils.data import DataLoader
from transformers import get_scheduler

from finetune.data import (
    Collator, Feedback, FeedbackCollator, PairCollator, Pairs, cache_dir, fingerprint, split_records, train_eval_split,
)
from finetune.errors import ModelError
from finetune.export import check_architecture
from finetune.model import (
    MethodRuntime, Placement, attach_lora, dtype_name, load_base_model, load_tokenizer, loftq_initialise,
    make_optimizer, prepare_loftq_base, resolve, use_compiled_norms, use_segmented_attention,
)
from finetune.objectives import make_objective
from finetune.recipe import Recipe
from finetune.train import checkpoint as ckpt, records
from finetune.train.distributed import check_launch, check_strategy, fsdp_plugin, load_optimizer_state, shard_on_cpu
from finetune.train.records import MetricsLog
from finetune.train.run import LoopState, Run, Window


def setup(recipe: Recipe, console: Console, *, overwrite: bool, resume: str | None) -> tuple[Run, dict | None]:
    """Recipe -> data -> model -> optimizer, restored from a checkpoint when resuming.
    Returns the run and the RNG state to restore once the data iterator exists (None for a fresh run)."""
    t = recipe.training
    placement = resolve(recipe.quantization)
    records.check_trackers(t.report_to)
    accelerator = _accelerator(recipe, placement)
    check_strategy(recipe, placement)
    objective = make_objective(recipe)  # before anything heavy: e.g. a GRPO reward module that does not import
    check_architecture(recipe.model.name_or_path)  # a family finetune does not cover: named, with those it does
    resume_from = ckpt.find_resume_checkpoint(recipe.run_dir, resume) if resume else None
    if accelerator.is_main_process and not resume_from:
        ckpt.prepare_run_dir(recipe.run_dir, overwrite)
    set_seed(t.seed)

    tokenizer = load_tokenizer(recipe.model, recipe.data.chat_template)
    train_set, eval_set, stats = train_eval_split(recipe.data, tokenizer, t.seed, cache_dir(recipe.run_dir))
    env = records.environment(accelerator.device, fingerprint(recipe.data, tokenizer))
    if resume_from:
        records.check_resume(resume_from, recipe, env, console if accelerator.is_main_process else None)
    source = prepare_loftq_base(recipe, placement.compute_dtype, write=accelerator.is_main_process and not resume_from,
                                resuming=bool(resume_from))  # T >= 2: the LoftQ base (model/loftq.py)
    accelerator.wait_for_everyone()
    base = load_base_model(source, recipe.quantization, accelerator.device, placement, head=objective.head)
    env["lora_dropout_masks"] = records.dropout_masks(resume_from)  # a resumed run keeps the masks it began with
    model = attach_lora(base, recipe, placement, masks=env["lora_dropout_masks"])
    loftq = loftq_initialise(model, recipe) if recipe.lora.init == "loftq" and not resume_from else None
    env["rms_norm"] = use_compiled_norms(model)  # CPU: one compiled kernel each way, or why the norms stay eager
    cached = _cache_dequantized(recipe, model, accelerator.device, placement)
    if recipe.data.packing or t.padding_free:
        use_segmented_attention(model)  # each example of a row attends to itself only, at its own cost
    collate = Collator(tokenizer.pad_token_id, padding_free=t.padding_free)
    collate = PairCollator(collate) if isinstance(train_set, Pairs) else collate  # a pair's two sides together
    collate = FeedbackCollator(collate) if isinstance(train_set, Feedback) else collate  # KTO: answers, KL pairs
    objective.prepare(model, train_set, eval_set, collate, t.micro_batch_size)  # e.g. DPO's precomputed reference
    # A private generator keeps data loading from consuming the global RNG (dropout's), for exact resume.
    train_dl = DataLoader(train_set, batch_size=t.micro_batch_size, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(t.seed))
    eval_dl = DataLoader(eval_set, batch_size=t.micro_batch_size, collate_fn=collate) if eval_set else None
    if getattr(accelerator.state, "fsdp_plugin", None) is not None and not accelerator.is_fsdp2:
        from peft.utils.other import fsdp_auto_wrap_policy  # FSDP1: frozen and trainable weights in separate units

        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    optimizer = make_optimizer(model, t)
    counts = model.get_nb_trainable_parameters()  # before sharding (PEFT counts a 4-bit shard as a float tensor)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    eval_dl = accelerator.prepare(eval_dl) if eval_dl is not None else None
    total_steps = t.max_steps or t.epochs * math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total_steps)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    run = Run(recipe, accelerator, placement, tokenizer, model, objective, optimizer, scheduler,
              train_dl, eval_dl, total_steps, env, MetricsLog(recipe.run_dir / "metrics.jsonl", accelerator, console),
              stats.examples // 2 if isinstance(train_set, Pairs) else stats.examples)  # pairs count once
    run.method = MethodRuntime(accelerator.unwrap_model(model), recipe, total_steps)  # e.g. AdaLoRA's real steps
    if initial_adapter(recipe):  # PiSSA/OLoRA: B0 A0 written before training, checked when resuming
        ckpt.keep_initial_adapter(accelerator.unwrap_model(model), initial_adapter(recipe), bool(resume_from), run.main)
    rng = _restore(run, resume_from) if resume_from else None
    if t.eval_generate_steps and run.main:
        prompted = [r for r in split_records(recipe.data, t.seed)[1] if r.fmt in ("alpaca", "chat", "completion")]
        run.generation_records = prompted[: t.eval_generate_examples]
    if run.main:
        _start_records(run, resume_from)
        console.print(_banner(run, counts, len(eval_set), stats, resume_from))
        if loftq is not None:
            console.print(f"LoftQ: ||W - Q||/||W|| {loftq['error_before']:.4f} -> ||W - Q - sBA||/||W|| "
                          f"{loftq['error_after']:.4f} over the adapted layers")
        if cached is not None:
            q = recipe.quantization.quant_type
            own = {"icq_nf4": "ICQ-NF4 layers", "gguf": f"{Path(recipe.model.name_or_path).name}'s own quantized "
                   "tensors"}.get(q, f"{q.upper()} (bitsandbytes)")
            console.print(f"base: {own}, "
                          + ("dequantized once and cached" if cached else "dequantized at every forward"))
    return run, rng



def _cache_dequantized(recipe: Recipe, model, device: torch.device, placement: Placement) -> bool | None:
    """A 4-bit base keeps its dequantized weights between forwards (model/weight_cache.py: the same numbers) when
    quantization.cache_dequantized is true, or auto and `finetune plan` predicts the run fits with them (an NF4
    base: on the CPU only). None: no 4-bit base."""
    q = recipe.quantization
    if not q.load_in_4bit:
        return None
    if placement.shards_parameters and not q.packed:  # FSDP / ZeRO-3 hold a shard of each layer's codes
        if q.cache_dequantized is True:
            raise ModelError("quantization.cache_dequantized true keeps each layer's whole dequantized weight, but "
                             f"{placement.strategy} shards the 4-bit weights across processes: set it to auto or "
                             "false, or run one process per device (DDP)")
        return False
    on = q.cache_dequantized is True
    if q.cache_dequantized == "auto":
        from finetune.plan import CACHE_TERM, plan

        on = plan(recipe, device=device.type).term(CACHE_TERM).counted
    if on:
        from finetune.model import cache_weights

        cache_weights(model, placement.compute_dtype)
    return on


def initial_adapter(recipe: Recipe) -> Path | None:
    """Where a PiSSA/OLoRA run keeps its adapter as initialised (what checkpoints are converted against)."""
    return recipe.run_dir / "initial_adapter" if recipe.lora.init.startswith(("pissa", "olora")) else None



def _accelerator(recipe: Recipe, placement: Placement) -> Accelerator:
    t = recipe.training
    cpu = not torch.cuda.is_available()  # without it, torchrun on CPU would start N independent runs, not gloo DDP
    check_launch(placement, cpu)
    plugin = fsdp_plugin(placement)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=placement.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=t.seed),
        log_with=t.report_to or None,
        project_dir=str(recipe.run_dir),
        # AdaMix's routing leaves the experts not drawn in a step without gradients: DDP must not wait for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        if recipe.adapter.method == "adamix" else None,
        fsdp_plugin=plugin,
    )
    if cpu and plugin is not None:
        shard_on_cpu(accelerator, plugin)
    return accelerator



def _restore(run: Run, path: Path) -> dict:
    """Load a checkpoint's adapter, optimizer, scheduler, loop state and window; return this process's RNG state."""
    trainer_state, saved = ckpt.load_training_state(path)
    run.state = LoopState(**{k: trainer_state[k] for k in asdict(LoopState()) if k in trainer_state})
    window = dict(saved["window"])
    window.setdefault("units", window.pop("tokens", 0))  # checkpoints written before objectives
    run.window = Window(**window)
    if not run.method.restores_weights:  # P-tuning / prefix projection: the saved adapter is the encoder's output
        ckpt.load_adapter_weights(run.accelerator.unwrap_model(run.model), path)
    load_optimizer_state(run, saved["optimizer"])  # under FSDP, this process's shards of it
    run.scheduler.load_state_dict(saved["scheduler"])
    if run.accelerator.scaler is not None and saved.get("scaler"):
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    acc = run.accelerator
    rng = ckpt.this_process_rng(saved["rng"], acc.num_processes, acc.process_index)  # checks the process count
    run.objective.load_state_dict(saved.get("objective", [{}] * acc.num_processes)[acc.process_index])
    run.method.load_state_dict(saved.get("method", {}))
    return rng



def _start_records(run: Run, resume_from: Path | None) -> None:
    run_dir = run.recipe.run_dir
    if resume_from:  # a crash may have logged steps after the checkpoint: they are about to be redone
        records.truncate_metrics(run_dir / "metrics.jsonl", run.state.step)
    (run_dir / "recipe.yaml").write_text(run.recipe.to_yaml())
    ckpt.write_json(run_dir / "environment.json", run.env)
    run.accelerator.init_trackers(run.recipe.name or "finetune", config=records.tracker_config(run.recipe))



def _banner(run: Run, counts: tuple[int, int], n_eval: int, stats, resume_from: Path | None) -> str:
    t, acc = run.recipe.training, run.accelerator
    trainable, total = counts
    return (
        f"[bold]{run.recipe.name}[/]: {run.train_examples} train / {n_eval} eval "
        f"{'pairs' if run.objective.unit == 'pair' else 'examples'} "
        f"({stats.truncated} truncated, {stats.dropped} dropped), {run.total_steps} steps, effective batch "
        f"{t.micro_batch_size} x {t.gradient_accumulation_steps} x {acc.num_processes} processes"
        + (f", resuming from {resume_from} at step {run.state.step}" if resume_from else "")
        + f"\ntrainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), "
        f"objective {t.objective}, method {run.recipe.adapter.method}, compute dtype {dtype_name(run.placement.compute_dtype)}, device {acc.device}"
        + (f", RMSNorm {run.env['rms_norm']}" if acc.device.type == "cpu" else "")
    )
