"""finetune's GRPO and TRL's GRPOTrainer on the same tiny job: equal first-step loss and gradient, and speed.

1. Equality: one 4-bit SmolLM2 + LoRA model (adapter as initialised, B = 0, so policy = reference).
   TRL's trainer samples and scores step 1's completions; on exactly those inputs (prompt ids, completion
   ids and masks, advantages, reference log-probs) TRL's `compute_loss` and finetune's GRPO loss are
   computed and back-propagated on the same model: loss and gradient norm must agree.
2. Speed: `--steps N` optimizer steps of each (the same prompts per step, G, lengths, sampling settings):
   examples (prompts x G completions) per second, end to end.

Needs TRL (`pip install trl`, the `bench` extra); `--tools finetune` runs finetune's side of 2. alone, as CI does on
the tiny test model (tests/test_scripts.py). Run from the repository root:
    python scripts/grpo_vs_trl.py --steps 3
    python scripts/grpo_vs_trl.py --steps 1 grpo.group_size=2 grpo.max_new_tokens=8   # recipe overrides
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.data import split_records, to_messages  # noqa: E402
from finetune.objectives.grpo import GRPO  # noqa: E402
from finetune.model import attach_lora, load_base_model, load_tokenizer, resolve  # noqa: E402
from finetune.recipe.file import load_recipe  # noqa: E402
from finetune.objectives.rewards import load_rewards, score  # noqa: E402

RECIPE = "recipes/grpo_quickstart.yaml"


def trl_rewards(rewards):
    """finetune's rewards as TRL reward functions (same names, same values; weights given to TRL separately)."""
    def make(r):
        def fn(prompts, completions, reference, **_):
            texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
            return score([r], ["" for _ in texts], [t.strip() for t in texts], list(reference))[1][r.name]
        fn.__name__ = r.name
        return fn
    return [make(r) for r in rewards]


def build(recipe):
    tok = load_tokenizer(recipe.model, recipe.data.chat_template)
    torch.manual_seed(recipe.training.seed)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, "cpu", resolve(recipe.quantization)), recipe,
                        resolve(recipe.quantization))
    return tok, model


def trl_trainer(recipe, model, tok, steps: int, out: Path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    g, t = recipe.grpo, recipe.training
    records = split_records(recipe.data, t.seed)[0]
    rows = [{"prompt": to_messages(r)[:-1], "reference": to_messages(r)[-1]["content"]} for r in records]
    args = GRPOConfig(
        output_dir=str(out), use_cpu=not torch.cuda.is_available(), max_steps=steps, learning_rate=t.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.micro_batch_size * g.group_size, gradient_accumulation_steps=1,
        num_generations=g.group_size, max_completion_length=g.max_new_tokens, temperature=g.temperature,
        top_p=g.top_p, top_k=0, beta=g.beta, epsilon=g.epsilon, loss_type=g.loss if g.loss != "token" else "dapo",
        num_iterations=g.updates_per_generation, scale_rewards="none" if g.loss == "dr_grpo" else "group",
        reward_weights=[r.weight for r in recipe.rewards], logging_steps=1, report_to="none", save_strategy="no",
        seed=t.seed, bf16=False, gradient_checkpointing=False, disable_dropout=True, log_completions=False,
        mask_truncated_completions=False,
    )
    return GRPOTrainer(model=model, reward_funcs=trl_rewards(load_rewards(recipe.rewards)), args=args,
                       train_dataset=Dataset.from_list(rows), processing_class=tok)


def our_batch(objective, model, tok, inputs) -> dict:
    """finetune's training batch for TRL's step inputs (same prompt and completion tokens, same advantages)."""
    prompts = [p[m.bool()].tolist() for p, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
    completions = [c[m.bool()].tolist() for c, m in zip(inputs["completion_ids"], inputs["completion_mask"])]
    device = next(model.parameters()).device
    run = SimpleNamespace(tokenizer=tok, model=model, accelerator=SimpleNamespace(device=device))
    G = objective.s.group_size
    batch = objective._batch(run, prompts[::G], completions, inputs["advantages"].float().cpu())
    batch.update(step_values=torch.zeros(len(objective.step_metrics)), token_scale=torch.tensor(1.0))
    return batch


def take_grads(model) -> torch.Tensor:
    flat = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return flat


def equality(recipe, out: Path) -> dict:
    tok, model = build(recipe)
    trainer = trl_trainer(recipe, model, tok, 1, out / "trl_eq")
    captured = {}
    real = trainer._generate_and_score_completions

    def keep(*a, **k):
        captured["inputs"] = real(*a, **k)
        return captured["inputs"]

    trainer._generate_and_score_completions = keep
    batch_iter = iter(trainer.get_train_dataloader())
    trainer._prepare_inputs(next(batch_iter))  # samples and scores step 1 (adapter as initialised)
    inputs = captured["inputs"]
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop, which this step skips
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grad = take_grads(model)
    objective = GRPO(recipe)
    batch = our_batch(objective, model, tok, inputs)
    ours = objective(model, batch)
    loss = ours.total / objective.units(batch)
    loss.backward()
    grad = take_grads(model)
    return {"trl_loss": trl_loss.item(), "finetune_loss": loss.item(), "trl_grad_norm": trl_grad.norm().item(),
            "finetune_grad_norm": grad.norm().item(),
            "grad_max_abs_diff_over_max_abs": ((grad - trl_grad).abs().max() / trl_grad.abs().max()).item(),
            "completions": int(inputs["completion_ids"].shape[0]),
            "completion_tokens": int(inputs["completion_mask"].sum()),
            "mean_reward": float(inputs.get("rewards", torch.tensor(float("nan"))).float().mean())
            if "rewards" in inputs else None}


def speed(recipe, steps: int, out: Path, trl: bool = True) -> dict:
    from finetune.train.loop import train

    examples = steps * recipe.training.micro_batch_size * recipe.grpo.group_size
    trl_s = None
    if trl:
        tok, model = build(recipe)
        trainer = trl_trainer(recipe, model, tok, steps, out / "trl_speed")
        started = time.perf_counter()
        trainer.train()
        trl_s = time.perf_counter() - started
    ours = recipe.model_copy(update={"output_dir": str(out / "finetune_speed"),
                                     "training": recipe.training.model_copy(update={"max_steps": steps,
                                                                                    "save_steps": None})})
    train(ours, overwrite=True)
    ours_s = json.loads((out / "finetune_speed" / "summary.json").read_text())["wall_time_s"]  # the loop, no loading
    return {"steps": steps, "examples": examples, "trl_s": trl_s and round(trl_s, 1), "finetune_s": round(ours_s, 1),
            "trl_examples_per_s": trl_s and examples / trl_s, "finetune_examples_per_s": examples / ours_s,
            "finetune_over_trl": trl_s and trl_s / ours_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="runs/grpo_vs_trl")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides, as `finetune train` takes them "
                   "(e.g. model.name_or_path=DIR grpo.max_new_tokens=8)")
    p.add_argument("--tools", default="finetune,trl", help="finetune alone runs without TRL: no 1., its side of 2.")
    args = p.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out)
    trl = "trl" in args.tools.split(",")
    report = {"equality": equality(recipe, out)} if trl else {}
    print(json.dumps(report, indent=2), flush=True)
    if not args.skip_speed:
        report["speed"] = speed(recipe, args.steps, out, trl)
    print(json.dumps(report, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
