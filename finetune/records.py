"""Run records: the environment a run used, checks before resuming, memory, the loss curve."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml

from finetune.errors import CheckpointError

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "finetune")


def environment(device: torch.device, data_fingerprint: str) -> dict:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            versions[lib] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "git_commit": _git_commit(),
        "data_fingerprint": data_fingerprint,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def check_resume(checkpoint: Path, recipe, env: dict, console) -> None:
    """Refuse to resume onto other data or another adapter shape; warn about other library versions."""
    try:
        saved_env = json.loads((checkpoint / "environment.json").read_text())
        saved_recipe = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot resume from {checkpoint}: its run records are unreadable ({e}).") from None
    problems = []
    if saved_env.get("data_fingerprint") != env["data_fingerprint"]:
        problems.append("the training data (files, data section or tokenizer) changed since the checkpoint")
    saved_lora = saved_recipe.get("lora", {})
    now_lora = json.loads(recipe.lora.model_dump_json())
    for key in ("r", "target_modules", "modules_to_save", "bias"):
        if saved_lora.get(key) != now_lora[key]:
            problems.append(f"lora.{key} changed ({saved_lora.get(key)!r} -> {now_lora[key]!r})")
    if problems:
        raise CheckpointError(
            f"Refusing to resume from {checkpoint}: " + "; ".join(problems)
            + ". Start a new run (another name or --overwrite) instead."
        )
    changed = [f"{lib} {old} -> {env['versions'].get(lib)}" for lib, old in saved_env.get("versions", {}).items()
               if lib != "finetune" and old != env["versions"].get(lib)]
    if changed and console is not None:
        console.print(f"[yellow]warning:[/] library versions differ from the checkpoint's: {', '.join(changed)}")


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """Train and eval loss against step, as a PNG (needs matplotlib, a core dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for points, label in ((train, "train"), (evals, "eval")):
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set(xlabel="step", ylabel="loss (response tokens)", title=metrics.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
