"""Benchmark `finetune train` against the standard stack: TRL's SFTTrainer with PEFT and bitsandbytes.

Both run the same job: same model, data, LoRA config, NF4 quantization, sequence length,
micro batch, accumulation, optimizer, learning-rate schedule, seed and compute dtype, once
in three variants: plain padded batches ("unpacked"); the same batches fed as one row
without padding ("padfree": finetune `training.padding_free: true`, TRL `padding_free=True`);
and packed rows (finetune `data.packing: true`; TRL `packing=True` with best-fit-decreasing
bins, which also makes its batches padding-free).
Every run is a fresh subprocess (so peak memory is per run), the order of the two tools
alternates between repeats, and the table shows medians and finetune/TRL ratios.

Equal work is checked, not assumed: the data order is the same in both (a seeded
permutation from the same seed), and the LoRA B matrices start at zero, so the first
optimizer step's loss must agree between the two tools to float precision in every
variant; the report prints both. Two TRL defaults would make the work different and are
undone: it stores QLoRA adapters in bfloat16 (they are cast back to float32, like
finetune's) and it defaults to gradient checkpointing (set to the recipe's value).

Throughput counts only loss-bearing tokens (the response tokens, not prompt or padding),
over the whole job after imports: model load, tokenization, training and saving the adapter.

    python scripts/bench.py                           # the default job, median of 3
    python scripts/bench.py --examples 16 --max-length 128 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
QUICKSTART = ROOT / "data" / "quickstart" / "train.jsonl"
TOOLS = ("finetune", "trl")
VARIANTS = ("unpacked", "padfree", "packed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--data", help="JSONL with question/answer (GSM8K), prompt/completion or alpaca records "
                   f"(default: {GSM8K} if present, else the quickstart data)")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resume", action="store_true", help="Reuse finished runs of the same job in --work.")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "inherit"],
                   help="OMP_WAIT_POLICY for both tools. PASSIVE: idle OpenMP threads sleep instead of spinning, which "
                   "keeps timings meaningful on a machine shared with other jobs (spinning threads there made a "
                   "step 3.5x slower).")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="Scratch directory (data, runs, logs).")
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    if args.worker:
        spec = json.loads((work / "spec.json").read_text())
        result = {"finetune": run_finetune, "trl": run_trl}[args.worker](spec, args.variant, work)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        result["peak_mem_gib"] = _peak_cuda_gib() or result["peak_rss_gib"]
        Path(args.result).write_text(json.dumps(result))
        return 0

    work.mkdir(parents=True, exist_ok=True)
    spec = make_spec(args, work)
    previous = work / "spec.json"
    reuse = args.resume and previous.is_file() and json.loads(previous.read_text()) == spec
    previous.write_text(json.dumps(spec, indent=2))
    tools = [t for t in args.tools.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    print(f"job: {spec['examples']} examples of {spec['data_source']}, {spec['label_tokens']:,} loss-bearing tokens, "
          f"max length {spec['max_length']}, micro batch {spec['micro_batch']} x {spec['accumulation']}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, OMP_WAIT_POLICY={args.omp_wait_policy}",
          flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    n, total = 0, args.repeats * len(variants) * len(tools)
    for repeat in range(args.repeats):
        for variant in variants:
            order = tools if repeat % 2 == 0 else tools[::-1]
            for tool in order:
                n += 1
                done = work / f"{tool}-{variant}-{repeat}.json"
                if reuse and done.is_file():
                    r = json.loads(done.read_text())
                else:
                    r = run_worker(tool, variant, work, repeat, args.omp_wait_policy)
                results.setdefault((tool, variant), []).append(r)
                print(f"[{n}/{total}] {tool:8s} {variant:8s} {r['wall_s']:7.1f} s  peak {r['peak_mem_gib']:.2f} GiB  "
                      f"step-1 loss {r['losses'][0]:.4f}  load {os.getloadavg()[0]:.2f}", flush=True)
    summary = summarize(results, spec)
    runs = {f"{t}/{v}": rs for (t, v), rs in results.items()}
    (work / "results.json").write_text(json.dumps({"spec": spec, "runs": runs, "summary": summary}, indent=2))
    print_table(summary, variants, args.repeats)
    print(f"raw results: {work / 'results.json'}")
    return 0


# ------------------------------------------------------------------ the job


def make_spec(args, work: Path) -> dict:
    """Write the job's data (prompt/completion JSONL) and return everything both workers need."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    source = Path(args.data) if args.data else GSM8K if GSM8K.is_file() else QUICKSTART
    rows, label_tokens, skipped = [], 0, 0
    with open(source) as f:
        for line in f:
            if not line.strip() or len(rows) == args.examples:
                continue
            row = _prompt_completion(json.loads(line))
            prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            completion = tok(row["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]
            if len(prompt) + len(completion) > args.max_length:
                skipped += 1  # truncation rules differ between the tools: only whole examples
                continue
            rows.append(row)
            label_tokens += len(completion)
    if len(rows) < args.examples:
        sys.exit(f"{source} has only {len(rows)} records within {args.max_length} tokens; "
                 f"--examples is {args.examples}")
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "data": str(data), "data_source": str(source), "examples": args.examples, "label_tokens": label_tokens,
        "skipped_overlong": skipped,
        "max_length": args.max_length, "micro_batch": args.micro_batch, "accumulation": args.accumulation,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "learning_rate": 2e-4, "optimizer": "paged_adamw_32bit", "seed": 42,
    }


def _prompt_completion(rec: dict) -> dict:
    """One record as {prompt, completion}; the prompt ends in a newline so both tools split tokens alike."""
    if "question" in rec:
        return {"prompt": rec["question"].strip() + "\n", "completion": rec["answer"]}
    if "prompt" in rec:
        return {"prompt": rec["prompt"], "completion": rec["completion"]}
    prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return {"prompt": prompt.strip() + "\n", "completion": rec["output"]}


def run_worker(tool: str, variant: str, work: Path, repeat: int, wait_policy: str) -> dict:
    """One run in a fresh process, so that its peak memory is its own."""
    result = work / f"{tool}-{variant}-{repeat}.json"
    log = work / f"{tool}-{variant}-{repeat}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = wait_policy
    cmd = [sys.executable, __file__, "--work", str(work), "--worker", tool, "--variant", variant,
           "--result", str(result)]
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{tool} {variant} failed (exit {done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return json.loads(result.read_text())


def run_finetune(spec: dict, variant: str, work: Path) -> dict:
    """`finetune train` on a recipe for the job (in-process: the same function the CLI verb calls)."""
    import yaml
    from rich.console import Console

    from finetune.cli import _quiet_libraries
    from finetune.recipe_file import load_recipe
    from finetune.train import train

    _quiet_libraries()
    run_dir = work / f"finetune-{variant}"
    recipe = {
        "name": f"bench-{variant}", "output_dir": str(run_dir),
        "model": {"name_or_path": spec["model"]},
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "lora": {**spec["lora"], "target_modules": "all-linear"},
        "data": {"train": [spec["data"]], "format": "completion", "template": "none",
                 "max_length": spec["max_length"], "packing": variant == "packed"},
        "training": {
            "epochs": 1, "micro_batch_size": spec["micro_batch"], "gradient_accumulation_steps": spec["accumulation"],
            "learning_rate": spec["learning_rate"], "warmup_steps": 0, "scheduler": "cosine",
            "optimizer": spec["optimizer"], "gradient_checkpointing": spec["gradient_checkpointing"],
            "max_grad_norm": 1.0, "weight_decay": 0.0, "logging_steps": 1, "seed": spec["seed"],
            "padding_free": variant == "padfree",
        },
    }
    path = work / f"finetune-{variant}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start, cpu = time.perf_counter(), time.process_time()
    train(load_recipe(path), overwrite=True, console=Console(stderr=True, force_terminal=False))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "train_s": summary["wall_time_s"],
            "losses": [r["loss"] for r in rows if "loss" in r]}


def run_trl(spec: dict, variant: str, work: Path) -> dict:
    """The same job as TRL's documentation writes it: SFTTrainer + LoraConfig + a 4-bit model."""
    import warnings

    import torch
    from datasets import disable_progress_bars, load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    warnings.filterwarnings("ignore")
    start, cpu = time.perf_counter(), time.process_time()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=dtype, device_map={"": 0 if cuda else "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        ),
    )
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lora = spec["lora"]
    config = SFTConfig(
        output_dir=str(work / f"trl-{variant}"), num_train_epochs=1,
        per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim=spec["optimizer"], gradient_checkpointing=spec["gradient_checkpointing"],
        bf16=dtype == torch.bfloat16, fp16=False, use_cpu=not cuda,
        # TRL refuses max_length with padding_free unpacked; every example of the job fits max_length anyway
        max_length=None if variant == "padfree" else spec["max_length"],
        packing=variant == "packed", padding_free=variant != "unpacked",
        completion_only_loss=True,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model, args=config, processing_class=tok,
        train_dataset=load_dataset("json", data_files=spec["data"], split="train"),
        peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for p in trainer.model.parameters():  # TRL stores QLoRA adapters in bf16; finetune (and this job) use fp32
        if p.requires_grad:
            p.data = p.data.float()
    output = trainer.train()
    trainer.save_model()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": wall, "cpu_s": cpu, "train_s": output.metrics["train_runtime"], "losses": losses}


def _peak_cuda_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ------------------------------------------------------------------ report


def summarize(results: dict, spec: dict) -> dict:
    """Medians per (tool, variant) of the measured quantities."""
    out = {}
    for (tool, variant), runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        tail = lambda r: r["losses"][-max(1, len(r["losses"]) // 4):]  # noqa: E731 - last quarter of the steps
        out[f"{tool}/{variant}"] = {
            "wall_s": wall,
            "examples_per_s": spec["examples"] / wall,
            "tokens_per_s": spec["label_tokens"] / wall,
            "peak_mem_gib": statistics.median(r["peak_mem_gib"] for r in runs),
            "final_loss": statistics.median(statistics.fmean(tail(r)) for r in runs),
            "step1_loss": statistics.median(r["losses"][0] for r in runs),
            "train_s": statistics.median(r["train_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "steps": len(runs[0]["losses"]),
        }
    return out


ROWS = [  # key, label, format
    ("wall_s", "wall time (s)", "{:.1f}"),
    ("examples_per_s", "examples/s", "{:.3f}"),
    ("tokens_per_s", "loss tokens/s", "{:.1f}"),
    ("peak_mem_gib", "peak memory (GiB)", "{:.2f}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("step1_loss", "step-1 loss", "{:.4f}"),
    ("train_s", "train loop (s)", "{:.1f}"),
    ("cpu_s", "CPU time (s)", "{:.1f}"),
]


def print_table(summary: dict, variants: list[str], repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"finetune vs TRL SFTTrainer, median of {repeats}")
    table.add_column("")
    for v in variants:
        for label in ("finetune", "TRL", "ratio"):
            table.add_column(f"{v}\n{label}", justify="right")
    for key, label, fmt in ROWS:
        cells = []
        for v in variants:
            a, b = summary.get(f"finetune/{v}", {}).get(key), summary.get(f"trl/{v}", {}).get(key)
            cells += [fmt.format(a) if a is not None else "-", fmt.format(b) if b is not None else "-",
                      f"{a / b:.2f}x" if a is not None and b else "-"]
        table.add_row(label, *cells)
    console = Console(width=160)
    console.print(table)
    best = {t: max((k for k in summary if k.startswith(t)), key=lambda k: summary[k]["examples_per_s"], default=None)
            for t in TOOLS}
    if all(best.values()):
        a, b = summary[best["finetune"]], summary[best["trl"]]
        ratio = a["examples_per_s"] / b["examples_per_s"]
        console.print(f"best vs best: {best['finetune']} / {best['trl']}: {ratio:.2f}x "
                      f"examples/s at {a['peak_mem_gib'] / b['peak_mem_gib']:.2f}x peak memory")
    for v in variants:
        if f"finetune/{v}" in summary and f"trl/{v}" in summary:
            a, b = summary[f"finetune/{v}"]["step1_loss"], summary[f"trl/{v}"]["step1_loss"]
            verdict = "agree" if abs(a - b) <= 2e-3 * abs(b) else "DIFFER: not the same work"
            console.print(f"{v}: same batches, same step-1 loss: finetune {a:.5f}, TRL {b:.5f} ({verdict})")


if __name__ == "__main__":
    sys.exit(main())
