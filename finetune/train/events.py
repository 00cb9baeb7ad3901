"""What happens between steps when it is due: eval loss, generation metrics, checkpoints, a stop on a signal."""

from __future__ import annotations

import json
import math
import signal
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import gather_object

from finetune.errors import TrainingInterrupted
from finetune.evaluate import eval_objective
from finetune.generate import GenerationOptions, generation_metrics
from finetune.train import checkpoint as ckpt, records
from finetune.train.distributed import gathered_weights, optimizer_state
from finetune.train.interrupt import StopOnSignal, agreed_signal
from finetune.train.run import Run
from finetune.train.setup import initial_adapter


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
            metrics, samples = generation_metrics(model, run.tokenizer, run.generation_records, options)
        run.log.write({"step": run.state.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        with open(run.recipe.run_dir / "eval_samples.jsonl", "a") as f:  # what the board shows per eval step
            f.writelines(json.dumps({"step": run.state.step, "index": i, **s}) + "\n" for i, s in enumerate(samples))
    run.accelerator.wait_for_everyone()



def save(run: Run, name: str, eval_record: dict | None = None) -> Path:
    """Write checkpoint `name` (all processes take part; the main one writes) and prune old ones."""
    acc, state, t = run.accelerator, run.state, run.recipe.training
    acc.wait_for_everyone()
    path = run.recipe.run_dir / name
    if eval_record and (state.best_eval_loss is None or eval_record["eval_loss"] < state.best_eval_loss):
        state.best_eval_loss, state.best_checkpoint = eval_record["eval_loss"], str(path)
    # Sharded (FSDP/ZeRO-3) weights and optimizer state are gathered by every process; DDP replicas are whole.
    state_dict, optimizer = gathered_weights(run), optimizer_state(run)
    rng = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else [ckpt.rng_state()]  # one per process
    objective = [run.objective.state_dict()]  # e.g. GRPO's generation batch being reused, one per process
    objective = gather_object(objective) if acc.num_processes > 1 else objective
    if run.main:
        training_state = {
            "optimizer": optimizer, "scheduler": run.scheduler.state_dict(),
            "rng": rng, "window": asdict(run.window), "objective": objective,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "method": run.method.state_dict(),
        }
        trainer_state = {**asdict(state), "total_steps": run.total_steps, "recipe": run.recipe.name,
                         "epochs_done": round(state.epoch + state.micro_in_epoch / len(run.train_dl), 4)}
        files = {"recipe.yaml": run.recipe.to_yaml(), "environment.json": run.env, "trainer_state.json": trainer_state,
                 "adapter_base.json": records.adapter_base(run.recipe)}
        with run.method.saving(final=name == "checkpoint-final"):
            ckpt.save_checkpoint(path, acc.unwrap_model(run.model), run.tokenizer, files, training_state, state_dict,
                                 initial_adapter=initial_adapter(run.recipe))
        if t.save_total_limit and name != "checkpoint-final":
            best = Path(state.best_checkpoint) if t.keep_best and state.best_checkpoint else None
            ckpt.prune_checkpoints(run.recipe.run_dir, t.save_total_limit, protect=best)
    acc.wait_for_everyone()
    return path
