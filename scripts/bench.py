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
    python scripts/bench.py --objective dpo           # DPO against TRL's DPOTrainer (below)

`--objective dpo` runs the same DPO job in both tools instead: finetune with `training.objective: dpo`,
`data.format: preference`, `data.template: none`; TRL with `DPOTrainer` + `DPOConfig`, `ref_model=None`
and a `peft_config`, so that in both the reference model is the 4-bit base with the adapter switched off.
Default job: the first 64 pairs of data/quickstart/preference_train.jsonl, max length 256, 4 pairs x 2
accumulation (8 optimizer steps), beta 0.1, sigmoid loss, learning rate 5e-4 (recipes/dpo_quickstart.yaml).
Two variants: "online" (one adapter-disabled reference forward per micro batch, both tools' default) and
"precomputed" (finetune `dpo.precompute_reference: true`, TRL `precompute_ref_log_probs=True`: the
reference log-probabilities of every pair once, before training).

Same tokens: TRL's DPOTrainer applies no chat template to string (non-conversational) data; it tokenizes
prompt and prompt + answer + EOS as plain text (adding no BOS: SmolLM2's tokenizer adds none) and trains
on the tokens after their common prefix. finetune with `template: none` renders prompt text, then answer
text + EOS, tokenized separately, with labels on the answer and EOS. So `template: none` is the matching
rendering, and the job's data is checked to tokenize identically both ways (a pair whose tokens would
merge across the prompt/answer boundary, or that does not fit max_length, is not used: no truncation).
Same order: TRL's sampler and finetune's are the same seeded permutation of the pairs, and both put a
pair's two sequences in one padded micro batch (TRL: chosen rows then rejected rows; finetune: chosen,
rejected interleaved; the padded width is the same). Same computation: sequence log-probability = the
sum of the answer tokens' log-probabilities (EOS included) in both; loss = mean over the step's pairs.
TRL defaults undone to make it the same job: QLoRA adapters cast to bfloat16 (cast back to float32),
gradient checkpointing on (set to the recipe's value), `disable_dropout=True` (which zeroes the LoRA
dropout, so it is set False: both train with the job's LoRA dropout), bf16 autocast (off, fp32 on CPU).
Caches are cold in every DPO run (TRL's datasets cache would otherwise hand a later repeat the reference
log-probabilities an earlier one precomputed; finetune's tokenized-data cache is cleared alike).

Equal work is checked three ways: the step-1 loss must be log 2 = 0.69315 in both (LoRA B = 0, so policy =
reference); the step-1 mean log-probabilities of the chosen and rejected answers must agree (same tokens,
same pairs in the first step); and the step-2 loss (after one identical update) should agree to ~1e-3.
With LoRA dropout the two tools draw different dropout masks (different RNG streams and row layouts),
which alone moves step 2 by about that much: `--lora-dropout 0` makes the step-2 check exact.
Throughput for DPO is pairs/s and answer tokens/s (chosen + rejected answer tokens, EOS included).
"""

from __future__ import annotations

import argparse
import json
import math
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
PREFERENCE = ROOT / "data" / "quickstart" / "preference_train.jsonl"
TOOLS = ("finetune", "trl")
LAYOUTS = ("unpacked", "padfree", "packed")
VARIANTS = LAYOUTS + tuple(f"{v}-bf16" for v in LAYOUTS)  # "-bf16": bf16 compute; else float32 (on CPU)
DPO_VARIANTS = ("online", "precomputed")
# objective -> the job's defaults (a flag given on the command line wins)
DEFAULTS = {
    "sft": {"examples": 128, "max_length": 512, "accumulation": 4, "learning_rate": 2e-4,
            "variants": ("padfree", "packed", "padfree-bf16", "packed-bf16")},
    "dpo": {"examples": 64, "max_length": 256, "accumulation": 2, "learning_rate": 5e-4, "variants": DPO_VARIANTS},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--objective", choices=sorted(DEFAULTS), default="sft",
                   help="sft: against TRL's SFTTrainer; dpo: against TRL's DPOTrainer on preference pairs.")
    p.add_argument("--data", help="sft: JSONL with question/answer (GSM8K), prompt/completion or alpaca records "
                   f"(default: {GSM8K} if present, else the quickstart data); dpo: {{prompt, chosen, rejected}} "
                   f"strings (default: {PREFERENCE})")
    p.add_argument("--examples", type=int, help="Examples (dpo: pairs); default 128 (dpo: 64).")
    p.add_argument("--max-length", type=int, help="Default 512 (dpo: 256).")
    p.add_argument("--micro-batch", type=int, default=4, help="Examples (dpo: pairs) per micro batch.")
    p.add_argument("--accumulation", type=int, help="Default 4 (dpo: 2).")
    p.add_argument("--learning-rate", type=float, help="Default 2e-4 (dpo: 5e-4).")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=0.1, help="dpo: the DPO beta (sigmoid loss).")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resume", action="store_true", help="Reuse finished runs of the same job in --work.")
    p.add_argument("--variants", help=f"Of {','.join(VARIANTS)}; default {','.join(DEFAULTS['sft']['variants'])} "
                   f"(dpo: {','.join(DPO_VARIANTS)}). A -bf16 variant computes in bf16, the others in float32 (on CUDA "
                   "every variant is bf16).")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--trl-variants", help="TRL runs only these of --variants (default: all of them), e.g. to leave "
                   "out a setting already measured to be TRL's slower one.")
    p.add_argument("--omp-wait-policy", default="inherit", choices=["PASSIVE", "ACTIVE", "inherit"],
                   help="OMP_WAIT_POLICY for both tools. inherit (libgomp's default, spin a while then sleep) is the "
                   "fastest on an idle machine (PASSIVE cost 23%% there: docs/performance.md); PASSIVE keeps timings "
                   "meaningful on a machine shared with other jobs (spinning threads there made a step 3.5x slower).")
    p.add_argument("--allocator", default="auto", choices=["auto", "glibc"],
                   help="auto: both tools under the allocator `finetune train` picks here (tcmalloc on CPU where it "
                   "is installed, finetune/model/allocator.py), so that the table compares the tools, not allocators; "
                   "glibc: both without a preloaded allocator.")
    p.add_argument("--work", help="Scratch directory (data, runs, logs); default runs/bench (dpo: runs/bench-dpo).")
    p.add_argument("--gemm-tokens", type=int, default=1024,
                   help="Rows of the GEMM rate measurement (the MFU rows' denominator, scripts/bench_step.py peak).")
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS + DPO_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.objective].items():
        if getattr(args, key) is None:
            setattr(args, key, ",".join(value) if key == "variants" else value)
    dpo = args.objective == "dpo"
    work = Path(args.work or ROOT / "runs" / ("bench-dpo" if dpo else "bench")).resolve()
    if args.worker:
        spec = json.loads((work / "spec.json").read_text())
        runner = {"finetune": run_finetune, "trl": run_trl_dpo if spec.get("objective") == "dpo" else run_trl}
        result = runner[args.worker](spec, args.variant, work)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        result["peak_mem_gib"] = _peak_cuda_gib() or result["peak_rss_gib"]
        Path(args.result).write_text(json.dumps(result))
        return 0

    work.mkdir(parents=True, exist_ok=True)
    spec = make_preference_spec(args, work) if dpo else make_spec(args, work)
    previous = work / "spec.json"
    reuse = args.resume and previous.is_file() and json.loads(previous.read_text()) == spec
    previous.write_text(json.dumps(spec, indent=2))
    tools = [t for t in args.tools.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    trl_variants = set(args.trl_variants.split(",")) if args.trl_variants else set(variants)
    unit = "pairs" if dpo else "examples"
    print(f"job: {spec['objective']}, {spec['examples']} {unit} of {spec['data_source']}, "
          f"{spec['label_tokens']:,} loss-bearing tokens, "
          f"max length {spec['max_length']}, micro batch {spec['micro_batch']} x {spec['accumulation']}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, OMP_WAIT_POLICY={args.omp_wait_policy}",
          flush=True)
    from finetune.model.allocator import find_tcmalloc, for_training

    preload = find_tcmalloc() if args.allocator == "auto" and for_training() == "tcmalloc" else None
    machine = {**_machine(args.gemm_tokens), "allocator": "tcmalloc" if preload else "glibc"}
    print(f"machine: {machine['name']}, flags {' '.join(machine['flags']) or '-'}, allocator {machine['allocator']} "
          "(both tools); GEMM at the model's shapes: "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine["gemm_gflops"].items()), flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    n = 0
    total = args.repeats * sum(1 for v in variants for t in tools if t != "trl" or v in trl_variants)
    for repeat in range(args.repeats):
        for variant in variants:
            order = tools if repeat % 2 == 0 else tools[::-1]
            for tool in (t for t in order if t != "trl" or variant in trl_variants):
                n += 1
                done = work / f"{tool}-{variant}-{repeat}.json"
                if reuse and done.is_file():
                    r = json.loads(done.read_text())
                else:
                    r = run_worker(tool, variant, work, repeat, args.omp_wait_policy, cold=dpo,
                                   preload=preload)
                results.setdefault((tool, variant), []).append(r)
                step2 = f"  step-2 {r['losses'][1]:.5f}" if dpo and len(r["losses"]) > 1 else ""
                print(f"[{n}/{total}] {tool:8s} {variant:11s} {r['wall_s']:7.1f} s  peak {r['peak_mem_gib']:.2f} GiB  "
                      f"step-1 loss {r['losses'][0]:.5f}{step2}  load {os.getloadavg()[0]:.2f}", flush=True)
    summary = summarize(results, spec, machine)
    runs = {f"{t}/{v}": rs for (t, v), rs in results.items()}
    (work / "results.json").write_text(json.dumps({"spec": spec, "machine": machine, "runs": runs,
                                                   "summary": summary}, indent=2))
    print_table(summary, variants, args.repeats, spec)
    print(f"raw results: {work / 'results.json'}")
    return 0


# ------------------------------------------------------------------ the job


def make_spec(args, work: Path) -> dict:
    """Write the job's data (prompt/completion JSONL) and return everything both workers need."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    source = Path(args.data) if args.data else GSM8K if GSM8K.is_file() else QUICKSTART
    rows, label_tokens, skipped, lengths = [], 0, 0, []
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
            lengths.append(len(prompt) + len(completion))
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
        "lora": {"r": 16, "alpha": 32, "dropout": args.lora_dropout},
        "learning_rate": args.learning_rate, "optimizer": "paged_adamw_32bit", "seed": 42, "objective": "sft",
        "model_flops": _model_flops(args.model, lengths, label_tokens),
    }


def _model_flops(model: str, lengths: list[int], labelled: int) -> float:
    """The job's model FLOPs (finetune/plan/flops.py): one forward + backward over every example, LoRA r 16."""
    from transformers import AutoConfig

    from finetune.plan.flops import lora_params, train_flops

    config = AutoConfig.from_pretrained(model)
    return train_flops(config, lengths, labelled, lora_params(config, 16))


def make_preference_spec(args, work: Path) -> dict:
    """The DPO job's pairs (the first --examples usable ones), checked to tokenize identically in both tools."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    source = Path(args.data) if args.data else PREFERENCE
    rows, label_tokens, skipped, merged = [], 0, 0, 0
    with open(source) as f:
        for line in f:
            if not line.strip() or len(rows) == args.examples:
                continue
            rec = json.loads(line)
            if not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
                sys.exit(f"{source}: the DPO bench takes {{prompt, chosen, rejected}} strings")
            prompt = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
            sides = []
            for k in ("chosen", "rejected"):
                answer = tok(rec[k] + tok.eos_token, add_special_tokens=False)["input_ids"]  # finetune: separately
                joint = tok(rec["prompt"] + rec[k] + tok.eos_token)["input_ids"]  # TRL: prompt + answer as one text
                sides.append((answer, joint == prompt + answer))
            if not all(same for _, same in sides):
                merged += 1  # tokens merge across the prompt/answer boundary: the tools would train other tokens
                continue
            if any(len(prompt) + len(answer) > args.max_length for answer, _ in sides):
                skipped += 1  # truncation rules differ between the tools: only whole pairs
                continue
            rows.append({k: rec[k] for k in ("prompt", "chosen", "rejected")})
            label_tokens += sum(len(answer) for answer, _ in sides)
    if len(rows) < args.examples:
        sys.exit(f"{source} has only {len(rows)} usable pairs within {args.max_length} tokens; "
                 f"--examples is {args.examples}")
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "objective": "dpo", "beta": args.beta, "loss": "sigmoid",
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "data": str(data), "data_source": str(source), "examples": args.examples, "label_tokens": label_tokens,
        "skipped_overlong": skipped, "skipped_boundary_merge": merged,
        "max_length": args.max_length, "micro_batch": args.micro_batch, "accumulation": args.accumulation,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora": {"r": 16, "alpha": 32, "dropout": args.lora_dropout},
        "learning_rate": args.learning_rate, "optimizer": "paged_adamw_32bit", "seed": 42,
    }


def _prompt_completion(rec: dict) -> dict:
    """One record as {prompt, completion}; the prompt ends in a newline so both tools split tokens alike."""
    if "question" in rec:
        return {"prompt": rec["question"].strip() + "\n", "completion": rec["answer"]}
    if "prompt" in rec:
        return {"prompt": rec["prompt"], "completion": rec["completion"]}
    prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return {"prompt": prompt.strip() + "\n", "completion": rec["output"]}


def run_worker(tool: str, variant: str, work: Path, repeat: int, wait_policy: str, cold: bool = False,
               preload: str | None = None) -> dict:
    """One run in a fresh process, so that its peak memory is its own. `cold`: with empty data caches.
    `preload`: an allocator library to preload (LD_PRELOAD), as `finetune train` does for itself."""
    result = work / f"{tool}-{variant}-{repeat}.json"
    log = work / f"{tool}-{variant}-{repeat}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = wait_policy
    if preload:
        env["LD_PRELOAD"] = ":".join(p for p in (preload, env.get("LD_PRELOAD", "")) if p)
    if cold:
        import shutil

        for cache in (work / ".cache", work / "hf-datasets"):  # finetune's tokenized data; TRL's datasets cache
            shutil.rmtree(cache, ignore_errors=True)
        env["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    cmd = [sys.executable, __file__, "--work", str(work), "--worker", tool, "--variant", variant,
           "--result", str(result)]
    with open(log, "w") as f:
        done = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{tool} {variant} failed (exit {done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return json.loads(result.read_text())


def run_finetune(spec: dict, variant: str, work: Path) -> dict:
    """`finetune train` on a recipe for the job (in-process: the same function the CLI verb calls)."""
    import yaml
    from rich.console import Console

    from finetune.progress import quiet_libraries
    from finetune.recipe.file import load_recipe
    from finetune.train.loop import train

    quiet_libraries()
    run_dir = work / f"finetune-{variant}"
    if spec.get("objective") == "dpo":
        recipe = {
            "name": f"bench-dpo-{variant}", "output_dir": str(run_dir),
            "model": {"name_or_path": spec["model"]},
            "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                             "compute_dtype": "bfloat16" if _bf16(variant) else "float32"},
            "lora": {**spec["lora"], "target_modules": "all-linear"},
            "data": {"train": [spec["data"]], "format": "preference", "template": "none",
                     "max_length": spec["max_length"]},
            "training": {
                "objective": "dpo", "epochs": 1, "micro_batch_size": spec["micro_batch"],
                "gradient_accumulation_steps": spec["accumulation"], "learning_rate": spec["learning_rate"],
                "warmup_steps": 0, "scheduler": "cosine", "optimizer": spec["optimizer"],
                "gradient_checkpointing": spec["gradient_checkpointing"], "max_grad_norm": 1.0, "weight_decay": 0.0,
                "logging_steps": 1, "seed": spec["seed"],
            },
            "dpo": {"beta": spec["beta"], "loss": spec["loss"], "precompute_reference": variant == "precomputed"},
        }
    else:
        recipe = _sft_recipe(spec, variant, run_dir)
    path = work / f"finetune-{variant}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start, cpu = time.perf_counter(), time.process_time()
    train(load_recipe(path), overwrite=True, console=Console(stderr=True, force_terminal=False))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "train_s": summary["wall_time_s"],
            "losses": [r["loss"] for r in rows if "loss" in r], **_logps(rows)}


def _logps(log: list[dict]) -> dict:
    """DPO: the mean log-probabilities of the chosen / rejected answers at each logged step."""
    return {k.replace("/", "_"): [r[k] for r in log if k in r]
            for k in ("logps/chosen", "logps/rejected") if any(k in r for r in log)}


def _layout(variant: str) -> str:
    return variant.removesuffix("-bf16")


def _bf16(variant: str) -> bool:
    """bf16 compute: the -bf16 variants, and every variant on a CUDA GPU that has bf16."""
    import torch

    return variant.endswith("-bf16") or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _sft_recipe(spec: dict, variant: str, run_dir: Path) -> dict:
    layout = _layout(variant)
    return {
        "name": f"bench-{variant}", "output_dir": str(run_dir),
        "model": {"name_or_path": spec["model"]},
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                         "compute_dtype": "bfloat16" if _bf16(variant) else "float32"},
        "lora": {**spec["lora"], "target_modules": "all-linear"},
        "data": {"train": [spec["data"]], "format": "completion", "template": "none",
                 "max_length": spec["max_length"], "packing": layout == "packed"},
        "training": {
            "epochs": 1, "micro_batch_size": spec["micro_batch"], "gradient_accumulation_steps": spec["accumulation"],
            "learning_rate": spec["learning_rate"], "warmup_steps": 0, "scheduler": "cosine",
            "optimizer": spec["optimizer"], "gradient_checkpointing": spec["gradient_checkpointing"],
            "max_grad_norm": 1.0, "weight_decay": 0.0, "logging_steps": 1, "seed": spec["seed"],
            "padding_free": layout == "padfree",
        },
    }


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
    dtype = torch.bfloat16 if _bf16(variant) else torch.float32  # bf16 as TRL's docs write it: bf16=True + dtype
    layout = _layout(variant)
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
        max_length=None if layout == "padfree" else spec["max_length"],
        packing=layout == "packed", padding_free=layout != "unpacked",
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


def run_trl_dpo(spec: dict, variant: str, work: Path) -> dict:
    """The same DPO job as TRL's documentation writes it: DPOTrainer + DPOConfig + LoraConfig + a 4-bit model,
    ref_model=None (the reference is the model with its adapter disabled)."""
    import warnings

    import torch
    from datasets import disable_progress_bars, load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference precompute's progress bar
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
    # bitsandbytes (0.50, CPUs with AVX512-BF16) repacks a Linear4bit's weight for its CPU inference kernel on the
    # first forward in eval mode whose input needs no grad, which changes the 4-bit layer's numerics for the rest of
    # the run (and a later state_dict() unpacks it lossily). TRL's reference precompute is such a forward (the model
    # is still in eval mode inside DPOTrainer.__init__); finetune's never is (its input embeddings require grad).
    # Without this, TRL "precomputed" trains another model: step-1 loss 0.6936, not log 2.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lora = spec["lora"]
    config = DPOConfig(
        output_dir=str(work / f"trl-{variant}"), num_train_epochs=1,
        per_device_train_batch_size=spec["micro_batch"], gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim=spec["optimizer"], gradient_checkpointing=spec["gradient_checkpointing"],
        bf16=dtype == torch.bfloat16, fp16=False, use_cpu=not cuda,
        max_length=spec["max_length"], beta=spec["beta"], loss_type=[spec["loss"]],
        precompute_ref_log_probs=variant == "precomputed",
        disable_dropout=False,  # TRL's default zeroes every dropout, the adapter's included; this job has LoRA dropout
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        seed=spec["seed"], data_seed=spec["seed"], dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model, ref_model=None, args=config, processing_class=tok,
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
    log = [h for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": wall, "cpu_s": cpu, "train_s": output.metrics["train_runtime"],
            "losses": [h["loss"] for h in log], **_logps(log)}


def _machine(gemm_tokens: int = 1024) -> dict:
    """The processor (or GPU), the CPU flags that decide bf16's speed, and the GEMM rate at the model's shapes in
    fp32 and bf16 (scripts/bench_step.py: the most these matrix products reach here, MFU's denominator)."""
    import torch

    if torch.cuda.is_available():
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        rate = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e9
        return {"name": torch.cuda.get_device_name(), "flags": [], "gemm_gflops": {"bf16": rate}}
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_step import gemm_peak

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                caps.get("cpu_name", "?"))
    flags = [k for k in ("avx2", "avx512_f", "avx512_vnni", "avx512_bf16", "amx_bf16") if caps.get(k)]
    return {"name": f"{name}, {os.cpu_count()} CPUs", "flags": flags, "gemm_gflops": gemm_peak(tokens=gemm_tokens)}


def _peak_cuda_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ------------------------------------------------------------------ report


def summarize(results: dict, spec: dict, machine: dict | None = None) -> dict:
    """Medians per (tool, variant) of the measured quantities; MFU: the job's model FLOPs over the train loop's
    time, against the GEMM rate of the variant's dtype (and of bf16, the machine's best)."""
    out = {}
    gemm = (machine or {}).get("gemm_gflops", {})
    for (tool, variant), runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        train_s = statistics.median(r["train_s"] for r in runs)
        achieved = spec["model_flops"] / train_s / 1e9 if spec.get("model_flops") else None
        own = gemm.get("bf16" if _bf16(variant) else "fp32")
        tail = lambda r: r["losses"][-max(1, len(r["losses"]) // 4):]
        out[f"{tool}/{variant}"] = {
            "wall_s": wall,
            "examples_per_s": spec["examples"] / wall,
            "tokens_per_s": spec["label_tokens"] / wall,
            "peak_mem_gib": statistics.median(r["peak_mem_gib"] for r in runs),
            "final_loss": statistics.median(statistics.fmean(tail(r)) for r in runs),
            "step1_loss": statistics.median(r["losses"][0] for r in runs),
            "step2_loss": statistics.median(r["losses"][1] for r in runs) if len(runs[0]["losses"]) > 1 else None,
            **{f"step1_{k}": statistics.median(r[k][0] for r in runs)
               for k in ("logps_chosen", "logps_rejected") if runs[0].get(k)},
            "train_s": train_s,
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "model_gflops_per_s": achieved,
            "mfu": achieved / own if achieved and own else None,
            "mfu_bf16": achieved / gemm["bf16"] if achieved and gemm.get("bf16") else None,
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
    ("model_gflops_per_s", "model GFLOP/s (train loop)", "{:.1f}"),
    ("mfu", "MFU vs own dtype's GEMM", "{:.1%}"),
    ("mfu_bf16", "MFU vs bf16 GEMM", "{:.1%}"),
]
DPO_ROWS = [  # DPO: pairs, answer tokens, and the step-2 loss
    ("wall_s", "wall time (s)", "{:.1f}"),
    ("examples_per_s", "pairs/s", "{:.3f}"),
    ("tokens_per_s", "answer tokens/s", "{:.1f}"),
    ("peak_mem_gib", "peak memory (GiB)", "{:.2f}"),
    ("step1_loss", "step-1 loss", "{:.5f}"),
    ("step2_loss", "step-2 loss", "{:.5f}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("train_s", "train loop (s)", "{:.1f}"),
    ("cpu_s", "CPU time (s)", "{:.1f}"),
]


def print_table(summary: dict, variants: list[str], repeats: int, spec: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    dpo = (spec or {}).get("objective") == "dpo"
    trainer = "DPOTrainer" if dpo else "SFTTrainer"
    table = Table(title=f"finetune vs TRL {trainer}, median of {repeats}")
    table.add_column("")
    for v in variants:
        for label in ("finetune", "TRL", "ratio"):
            table.add_column(f"{v}\n{label}", justify="right")
    for key, label, fmt in DPO_ROWS if dpo else ROWS:
        cells = []
        for v in variants:
            a, b = summary.get(f"finetune/{v}", {}).get(key), summary.get(f"trl/{v}", {}).get(key)
            cells += [fmt.format(a) if a is not None else "-", fmt.format(b) if b is not None else "-",
                      f"{a / b:.2f}x" if a is not None and b else "-"]
        table.add_row(label, *cells)
    console = Console(width=40 + 30 * len(variants))
    console.print(table)
    best = {t: max((k for k in summary if k.startswith(t)), key=lambda k: summary[k]["examples_per_s"], default=None)
            for t in TOOLS}
    if all(best.values()):
        a, b = summary[best["finetune"]], summary[best["trl"]]
        ratio = a["examples_per_s"] / b["examples_per_s"]
        console.print(f"best vs best: {best['finetune']} / {best['trl']}: {ratio:.2f}x "
                      f"{'pairs' if dpo else 'examples'}/s at {a['peak_mem_gib'] / b['peak_mem_gib']:.2f}x peak memory")
        within = [k for k in summary if k.startswith("finetune") and summary[k]["peak_mem_gib"] <= b["peak_mem_gib"]]
        if within:
            k = max(within, key=lambda k: summary[k]["examples_per_s"])
            console.print(f"finetune's fastest within TRL's best's memory: {k}: "
                          f"{summary[k]['examples_per_s'] / b['examples_per_s']:.2f}x at "
                          f"{summary[k]['peak_mem_gib'] / b['peak_mem_gib']:.2f}x peak memory")
    for v in variants:
        if f"finetune/{v}" not in summary or f"trl/{v}" not in summary:
            continue
        f, t = summary[f"finetune/{v}"], summary[f"trl/{v}"]
        if not dpo:
            a, b = f["step1_loss"], t["step1_loss"]
            tolerance = 1e-2 if _bf16(v) else 2e-3  # bf16: 8 mantissa bits, and the tools round in other places
            verdict = "agree" if abs(a - b) <= tolerance * abs(b) else "DIFFER: not the same work"
            console.print(f"{v}: same batches, same step-1 loss: finetune {a:.5f}, TRL {b:.5f} ({verdict})")
            continue
        log2 = math.log(2)
        ok = all(abs(x["step1_loss"] - log2) <= 1e-4 for x in (f, t))
        console.print(f"{v}: step-1 loss (must be log 2 = {log2:.5f}): finetune {f['step1_loss']:.5f}, "
                      f"TRL {t['step1_loss']:.5f} ({'agree' if ok else 'DIFFER'})")
        for k in ("logps_chosen", "logps_rejected"):
            a, b = f.get(f"step1_{k}"), t.get(f"step1_{k}")
            if a is not None and b is not None:
                same = abs(a - b) <= 1e-3 * max(1.0, abs(b))
                console.print(f"{v}: step-1 mean {k.replace('_', '/')} (same tokens, same pairs): finetune {a:.4f}, "
                              f"TRL {b:.4f} ({'agree' if same else 'DIFFER: not the same data'})")
        a, b = f.get("step2_loss"), t.get("step2_loss")
        if a is not None and b is not None:
            note = "within 1e-3" if abs(a - b) <= 1e-3 else (
                "DIFFER by more than 1e-3" + (" (LoRA dropout draws different masks in each tool; "
                                             "--lora-dropout 0 makes this exact)" if spec["lora"]["dropout"] else ""))
            console.print(f"{v}: step-2 loss (after one update): finetune {a:.5f}, TRL {b:.5f}, "
                          f"|diff| {abs(a - b):.1e} ({note})")


if __name__ == "__main__":
    sys.exit(main())
