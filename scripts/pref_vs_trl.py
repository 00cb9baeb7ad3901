"""finetune's KTO and reward model against TRL's KTOTrainer and RewardTrainer: the first steps' losses and metrics.

One LoRA model (float32, no 4-bit, no dropout) is built once and copied, so both trainers start from the same
weights; both train the same examples (the first N of the quickstart's feedback or preference data) for a few
steps with one micro batch of all N per step (so the data order cannot differ), AdamW, a constant learning rate
and clipping at 1. Per step, the loss and the objective's metrics of each are printed side by side, with the
examples/s of each (the training loop only, after loading).

TRL is given the very token sequences finetune trains on: the prompt as finetune renders it (chat template and
special tokens), the answer with its end-of-turn token; for the reward model the whole rendered sequence
(TRL appends its EOS, the pad token here, so transformers' pooling reads the same last token).
KTO: both pair each example's prompt with the previous example's answer for the KL estimate (TRL rotates within
its batch; with one batch of all N examples that is finetune's fixed pairing).

Needs TRL (`pip install trl`, the `bench` extra); `--tools finetune` runs finetune's side alone, as CI does on
the tiny test model (tests/test_scripts.py). From the repository root:
    python scripts/pref_vs_trl.py --objective kto
    python scripts/pref_vs_trl.py --objective reward
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import finetune.train.setup as setup  # noqa: E402
from finetune.data import normalize, read_rows, segments, tokenize_all  # noqa: E402
from finetune.model import attach_lora, load_base_model, load_tokenizer, resolve  # noqa: E402
from finetune.recipe.schema import Recipe  # noqa: E402

MODEL = "models/SmolLM2-135M-Instruct"
DATA = {"kto": "data/quickstart/feedback_train.jsonl", "reward": "data/quickstart/preference_train.jsonl"}


def recipe(objective: str, data: Path, n: int, steps: int, lr: float, out: Path, model: str = MODEL) -> Recipe:
    return Recipe.model_validate({
        "name": f"{objective}_vs_trl", "output_dir": str(out / f"finetune_{objective}"),
        "model": {"name_or_path": model}, "quantization": {"load_in_4bit": False, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [str(data)], "format": "feedback" if objective == "kto" else "preference",
                 "max_length": 256},
        "training": {"objective": objective, "max_steps": steps, "micro_batch_size": n,
                     "gradient_accumulation_steps": 1, "learning_rate": lr, "warmup_steps": 0,
                     "scheduler": "constant", "optimizer": "adamw_torch", "gradient_checkpointing": False,
                     "logging_steps": 1, "seed": 42, "max_grad_norm": 1.0},
        "kto": {"beta": 0.1},
    })


def trl_rows(r: Recipe, tok) -> list[dict]:
    """The recipe's examples as text TRL tokenizes into finetune's tokens (see the module docstring)."""
    rows = [normalize(row, r.data.format, {}) for _, row in read_rows(r.data.train[0])[0]]
    out = []
    for rec in rows:
        text = {}
        sides = {"kto": ["completion"], "reward": ["chosen", "rejected"]}[r.training.objective]
        for side in sides:
            answer = {"prompt": rec.data["prompt"], "answer": rec.data[side]}
            pieces = segments(type(rec)("answer", answer, ""), tok)
            cut = next(i for i, (_, resp) in enumerate(pieces) if resp)
            text[side] = ("".join(t for t, _ in pieces[:cut]), pieces[cut][0], "".join(t for t, _ in pieces[cut:]))
        if r.training.objective == "kto":
            prompt, answer, _ = text["completion"]
            out.append({"prompt": prompt, "completion": answer, "label": rec.data["label"]})
        else:
            out.append({side: text[side][0] + text[side][2] for side in sides})
    return out


def build(r: Recipe):
    placement = resolve(r.quantization)
    torch.manual_seed(r.training.seed)
    head = "score" if r.training.objective == "reward" else "lm"
    return attach_lora(load_base_model(r.model, r.quantization, "cpu", placement, head=head), r, placement)


def run_finetune(r: Recipe, model) -> tuple[list[dict], float]:
    from finetune.train.loop import train

    setup.attach_lora = lambda base, recipe, placement, **kw: model  # train exactly this model
    train(r, overwrite=True)
    rows = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in rows if "loss" in x], json.loads((r.run_dir / "summary.json").read_text())["wall_time_s"]


def run_trl(r: Recipe, model, tok, out: Path) -> tuple[list[dict], float]:
    from datasets import Dataset

    t = r.training
    common = dict(output_dir=str(out), use_cpu=True, max_steps=t.max_steps, learning_rate=t.learning_rate,
                  lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", max_grad_norm=t.max_grad_norm,
                  per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=1, logging_steps=1,
                  report_to="none", save_strategy="no", seed=t.seed, bf16=False, gradient_checkpointing=False,
                  max_length=r.data.max_length, disable_dropout=True)
    data = Dataset.from_list(trl_rows(r, tok))
    if t.objective == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(**common, beta=r.kto.beta, desirable_weight=r.kto.desirable_weight,
                         undesirable_weight=r.kto.undesirable_weight)
        trainer = KTOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok)
    else:
        from trl import RewardConfig, RewardTrainer

        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=data, processing_class=tok)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return [x for x in trainer.state.log_history if "loss" in x], seconds


PAIRS = {"kto": [("loss", "loss"), ("kl", "kl"), ("rewards/desirable", "rewards/chosen"),
                 ("rewards/undesirable", "rewards/rejected"), ("rewards/margin", "rewards/margins"),
                 ("grad_norm", "grad_norm")],
         "reward": [("loss", "loss"), ("rewards/accuracy", "accuracy"), ("rewards/margin", "margin"),
                    ("grad_norm", "grad_norm")]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=["kto", "reward"], required=True)
    p.add_argument("--examples", type=int, default=8, help="examples (KTO) or pairs (reward) per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="runs/pref_vs_trl")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--tools", default="finetune,trl", help="finetune alone runs without TRL (its side of the report)")
    args = p.parse_args()
    trl = "trl" in args.tools.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(DATA[args.objective])[0][: args.examples]
    data = out / f"{args.objective}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for _, r in rows))
    r = recipe(args.objective, data, args.examples, args.steps, args.lr, out, args.model)
    tok = load_tokenizer(r.model)
    tokenize_all([normalize(x, r.data.format, {}) for _, x in rows], r.data, tok)  # the data renders
    model = build(r)
    twin = copy.deepcopy(model) if trl else None
    ours, ours_s = run_finetune(r, model)
    theirs, trl_s = run_trl(r, twin, tok, out / f"trl_{args.objective}") if trl else ([{}] * len(ours), None)
    report = {"objective": args.objective, "examples_per_step": args.examples, "steps": []}
    for a, b in zip(ours, theirs):
        step = {"step": a["step"]}
        for mine, trl_key in PAIRS[args.objective]:
            step[mine] = {"finetune": a.get(mine), "trl": b.get(trl_key)}
        report["steps"].append(step)
    n = args.steps * args.examples
    report["speed"] = {"finetune_examples_per_s": n / ours_s, "trl_examples_per_s": n / trl_s if trl else None,
                       "finetune_over_trl": trl_s / ours_s if trl else None}
    print(json.dumps(report, indent=2))
    (out / f"{args.objective}_report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
