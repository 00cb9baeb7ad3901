"""Run records: the metrics log, the environment a run used, checks before resuming, memory, the loss curve."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml

from finetune.model import MASKS, allocator_in_use, cpu_dtype_override, cpu_has_native_bf16
from finetune.errors import CheckpointError, RecipeError
from finetune.recipe import LoraSection


class MetricsLog:
    """metrics.jsonl, the experiment trackers and a console line per record; main process only."""

    def __init__(self, path: Path, accelerator, console):
        self.path, self.accelerator, self.console = path, accelerator, console

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as f:  # "time" (Unix seconds) lets the board plot against wall time
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        self.console.print(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()), highlight=False, soft_wrap=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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
        "allocator": allocator_in_use(),  # finetune/model/allocator.py: tcmalloc for CPU training where installed
        "cpu_native_bf16": cpu_has_native_bf16(),  # what `compute_dtype: auto` reads on a CPU, with the override:
        "cpu_dtype_override": cpu_dtype_override(),  # FINETUNE_CPU_DTYPE (None: unset)
    }


def check_trackers(report_to: list[str]) -> None:
    """Fail before any work if a requested logger is not installed (accelerate would only warn and log nothing)."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    missing = [name for name in report_to if not available[name]()]
    if missing:
        raise RecipeError(
            f"training.report_to asks for {', '.join(missing)}, which is not installed: "
            f"pip install {' '.join(missing)}, or remove it from training.report_to."
        )


def tracker_config(recipe) -> dict:
    """The recipe as flat `section.key: value` pairs of scalars: TensorBoard's hparams take nothing else
    (lists and None are written as JSON text); wandb and mlflow show them just as well."""
    flat = {}
    for section, values in json.loads(recipe.model_dump_json()).items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def dropout_masks(checkpoint: Path | None) -> str:
    """How LoRA's dropout draws its masks on CPU (finetune/model/dropout.py's MASKS): "positions" for a new run,
    "shared" byte masks as runs began before 2026-12-08, "per adapter" before 2026-12-05 (their environment.json
    does not say): a resumed run keeps the random stream it began with, so it ends where it would have ended
    uninterrupted."""
    if checkpoint is None:
        return "positions"
    try:
        masks = json.loads((checkpoint / "environment.json").read_text()).get("lora_dropout_masks", "per adapter")
    except (OSError, ValueError):
        return "positions"  # check_resume names the unreadable records
    if masks not in MASKS:
        raise CheckpointError(f"Cannot resume from {checkpoint}: environment.json's lora_dropout_masks is {masks!r}; "
                              f"this finetune draws LoRA's dropout as one of {', '.join(map(repr, MASKS))}.")
    return masks


def check_resume(checkpoint: Path, recipe, env: dict, console) -> None:
    """Refuse to resume onto other data or another adapter shape; warn about other library versions."""
    try:
        saved_env = json.loads((checkpoint / "environment.json").read_text())
        saved_recipe = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot resume from {checkpoint}: its run records are unreadable ({e}).") from None
    problems = []
    if saved_env.get("data_fingerprint") != env["data_fingerprint"]:
        now_data = json.loads(recipe.data.model_dump_json())
        changed = [f"data.{k} {v!r} -> {now_data.get(k)!r}" for k, v in saved_recipe.get("data", {}).items()
                   if v != now_data.get(k)]
        problems.append("the training data changed since the checkpoint (" + (
            ", ".join(changed) if changed else "the contents of the data files or the tokenizer") + ")")
    saved_lora = saved_recipe.get("lora", {})
    now_lora = json.loads(recipe.lora.model_dump_json())
    defaults = json.loads(LoraSection().model_dump_json())  # keys a checkpoint from an older version lacks
    for key in ("r", "target_modules", "modules_to_save", "bias", "use_rslora", "use_dora", "init", "layers",
                "rank_pattern", "alpha_pattern"):
        if saved_lora.get(key, defaults[key]) != now_lora[key]:
            problems.append(f"lora.{key} changed ({saved_lora.get(key, defaults[key])!r} -> {now_lora[key]!r})")
    method, saved_method = recipe.adapter.method, (saved_recipe.get("adapter") or {}).get("method", "lora")
    now_section = json.loads(getattr(recipe, method).model_dump_json()) if method != "lora" else {}
    if saved_method != method:
        problems.append(f"adapter.method changed ({saved_method} -> {method})")
    elif method != "lora" and saved_recipe.get(method, now_section) != now_section:
        problems.append(f"the {method} section changed ({saved_recipe.get(method)} -> {now_section})")
    if problems:
        raise CheckpointError(
            f"Refusing to resume from {checkpoint}: " + "; ".join(problems)
            + ". Start a new run (another name or --overwrite) instead."
        )
    changed = [f"{lib} {old} -> {env['versions'].get(lib)}" for lib, old in saved_env.get("versions", {}).items()
               if lib != "finetune" and old != env["versions"].get(lib)]
    if changed and console is not None:
        console.print(f"[yellow]warning:[/] library versions differ from the checkpoint's: {', '.join(changed)}")


def truncate_metrics(metrics: Path, step: int) -> None:
    """Drop the lines logged after `step`: a run that died after its last checkpoint logged steps that
    the resumed run will log again, and metrics.jsonl must hold each step once."""
    if not metrics.exists():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        metrics.write_text("".join(kept))


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


def checkpoint_recipe(recipe) -> str:
    """The recipe.yaml a checkpoint holds: the run's, with the model the adapter is relative to (a LoftQ base)."""
    from finetune.model import loftq_trained_section

    return recipe.model_copy(update={"model": loftq_trained_section(recipe)}).to_yaml()


def adapter_base(recipe) -> dict:
    """The checkpoint record that says which base weights the saved adapter is relative to."""
    lora, q = recipe.lora, recipe.quantization
    record = {"base": recipe.model.name_or_path, "revision": recipe.model.revision, "init": lora.init,
              "relative_to": "published", "trained_on": f"4-bit {q.quant_type} quantization of the published weights"
              if q.load_in_4bit else "the published weights"}
    if q.load_in_4bit and q.quant_type == "gguf":  # the published weights are the quantized ones
        record["trained_on"] = "the GGUF file's own quantized tensors, as published"
    if lora.init == "loftq":
        from finetune.model import loftq_base_dir

        where = loftq_base_dir(recipe)
        record["trained_on"] = record["trained_on"] + f" (LoftQ init, {lora.loftq_iter} step(s): B A starts as the " \
            "rank-r fit of W - Q)"
        if where is not None:
            import hashlib

            manifest = hashlib.sha256((where / "manifest.json").read_bytes()).hexdigest()
            record.update(relative_to="loftq_base", base=str(where), base_manifest_sha256=manifest,
                          trained_on=f"the recipe's 4-bit quantization of the LoftQ base {where} (Q_T, float32 "
                          f"safetensors: LoftQ's {lora.loftq_iter} alternating steps quantize W - s B A)")
    if lora.init.startswith(("pissa", "olora")):
        record["trained_on"] = (f"the residual W - s B0 A0 of the published weights ({lora.init} init); "
                                "adapter_model.safetensors is converted to a LoRA of twice the rank over the "
                                "published weights, residual_adapter.safetensors holds the adapter as trained")
    return record

