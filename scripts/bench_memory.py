"""Peak memory as context grows: `finetune train` on packed GSM8K rows at several lengths, with and without
gradient checkpointing, under several allocator policies, against `finetune plan`.

    python scripts/bench_memory.py                                   # the table of docs/performance.md
    python scripts/bench_memory.py --lengths 2048 --policies default,mmap-128k,thp-mmap,trim,jemalloc

The job: recipes/gsm8k.yaml on ../shared/data/gsm8k/train.jsonl (or --data), packed rows of --lengths tokens,
micro batch 1, no accumulation, --steps optimizer steps, no eval. Each run is a fresh process (peak RSS is per
run: the kernel's ru_maxrss of the worker); tokens/s is the median over the steps after the first. Policies:

- default: glibc as it comes (freed blocks are kept for reuse; its mmap threshold grows with what is freed);
- mmap-128k: MALLOC_MMAP_THRESHOLD_=131072: every block of 128 KiB or more is mapped and unmapped on free;
- thp-mmap: blocks of 2 MiB or more mapped and unmapped, in transparent huge pages (PyTorch's
  THP_MEM_ALLOC_ENABLE=1 aligns and madvises tensors of 2 MiB or more): 1/512 of the page faults;
- trim: glibc defaults, malloc_trim(0) after every optimizer step (freed pages returned between steps);
- finetune: what finetune does by itself (no environment set): compare with default to see its own policy;
- jemalloc / tcmalloc: LD_PRELOAD of the library where it is installed (apt: libjemalloc2, libtcmalloc-minimal4).
"""

from __future__ import annotations

import argparse
import ctypes
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
LIBS = {"jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
POLICIES = {
    "default": {"FINETUNE_ALLOCATOR": "glibc"},
    "mmap-128k": {"FINETUNE_ALLOCATOR": "glibc", "MALLOC_MMAP_THRESHOLD_": "131072"},
    "thp-mmap": {"FINETUNE_ALLOCATOR": "glibc", "MALLOC_MMAP_THRESHOLD_": str(2 * 2**20), "THP_MEM_ALLOC_ENABLE": "1"},
    "trim": {"FINETUNE_ALLOCATOR": "glibc", "BENCH_TRIM": "1"},
    "finetune": {},
    "jemalloc": {"FINETUNE_ALLOCATOR": "glibc", "LD_PRELOAD": LIBS["jemalloc"]},
    "tcmalloc": {"FINETUNE_ALLOCATOR": "glibc", "LD_PRELOAD": LIBS["tcmalloc"]},
}


def overrides(args, length: int, checkpointing: bool, out: Path) -> list[str]:
    return [f"output_dir={out}", "data.datasets=[]", f"data.train={args.data}", f"data.max_length={length}",
            "data.packing=true", "data.overlong=truncate", "data.eval_fraction=0", "training.micro_batch_size=1",
            "training.gradient_accumulation_steps=1", f"training.max_steps={args.steps}", "training.logging_steps=1",
            "training.eval_steps=null", "training.save_steps=null", f"training.gradient_checkpointing={checkpointing}",
            f"quantization.compute_dtype={args.dtype}", *([f"model.name_or_path={args.model}"] if args.model else [])]


def worker(args) -> int:
    from rich.console import Console

    import finetune.train.loop as ft
    from finetune.progress import quiet_libraries
    from finetune.recipe.file import load_recipe

    quiet_libraries()
    if os.environ.get("BENCH_TRIM"):
        libc, step = ctypes.CDLL("libc.so.6"), ft.train_step

        def trimmed(run, group):
            result = step(run, group)
            libc.malloc_trim(0)
            return result

        ft.train_step = trimmed
    recipe = load_recipe(ROOT / "recipes" / "gsm8k.yaml", json.loads(args.worker))
    start = time.perf_counter()
    ft.train(recipe, overwrite=True, console=Console(stderr=True, force_terminal=False))
    rows = [json.loads(x) for x in (recipe.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    print(json.dumps({"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows),
                      "wall_s": time.perf_counter() - start}))
    return 0


def predicted(args, length: int, checkpointing: bool, out: Path) -> float:
    from finetune.plan.memory import plan
    from finetune.recipe.file import load_recipe

    return plan(load_recipe(ROOT / "recipes" / "gsm8k.yaml", overrides(args, length, checkpointing, out)),
                device="cpu").total / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="The model directory (default: recipes/gsm8k.yaml's, make fetch's SmolLM2).")
    p.add_argument("--data", default=str(GSM8K))
    p.add_argument("--lengths", default="512,2048,4096")
    p.add_argument("--checkpointing", default="false,true")
    p.add_argument("--policies", default="default,finetune")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-memory"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for length in map(int, args.lengths.split(",")):
        for checkpointing in (c == "true" for c in args.checkpointing.split(",")):
            out = work / f"run-{length}-{checkpointing}"
            plan_gib = predicted(args, length, checkpointing, out)
            for policy in args.policies.split(","):
                env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # libgomp's default: fastest idle
                env.update({"TOKENIZERS_PARALLELISM": "false", **POLICIES[policy]})
                if "LD_PRELOAD" in env and not Path(env["LD_PRELOAD"]).exists():
                    print(f"{policy}: {env['LD_PRELOAD']} is not installed; skipped", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--worker", json.dumps(overrides(args, length, checkpointing, out)),
                       "--steps", str(args.steps)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    sys.exit(f"{policy} at {length} failed:\n{done.stderr[-3000:]}")
                r = {"length": length, "checkpointing": checkpointing, "policy": policy, "plan_gib": plan_gib,
                     **json.loads(done.stdout.strip().splitlines()[-1])}
                r["plan_error"] = plan_gib / r["peak_gib"] - 1
                results.append(r)
                print(f"{length:5d} ckpt={str(checkpointing):5s} {policy:10s} {r['tokens_per_s']:7.1f} tokens/s  "
                      f"peak {r['peak_gib']:6.2f} GiB  plan {plan_gib:6.2f} GiB ({r['plan_error']:+.0%})", flush=True)
                (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
