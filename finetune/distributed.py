"""Running one recipe on many processes: which launcher strategy is active, what it requires of the
recipe, and `--nproc` as a shortcut for accelerate's launcher.

Nothing here distributes anything: accelerate (DDP, FSDP, DeepSpeed) and torch.distributed do,
configured by `accelerate launch --config_file recipes/accelerate/<preset>.yaml` or by `torchrun`.
This module only reads the environment those launchers set, so the recipe can be checked against
the strategy before any model is loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

from finetune.errors import RecipeError
from finetune.recipe import QuantizationSection, Recipe


def strategy() -> str:
    """`fsdp`, `deepspeed`, `ddp` (several processes, plain data parallel) or `single`."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def shards_parameters() -> bool:
    """FSDP and DeepSpeed ZeRO-3 shard the (quantized) parameters across processes."""
    s = strategy()
    return s == "fsdp" or (s == "deepspeed" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def quant_storage(q: QuantizationSection) -> str:
    """The storage dtype for 4-bit codes: FSDP and ZeRO-3 can only shard float tensors, and every
    parameter of a wrapped unit must share one dtype, so there the codes are stored in the compute dtype."""
    if q.quant_storage != "auto":
        return q.quant_storage
    if shards_parameters():
        from finetune.model import resolve_compute_dtype

        return str(resolve_compute_dtype(q.compute_dtype)).removeprefix("torch.")
    return "uint8"


def check_strategy(recipe: Recipe) -> None:
    """Refuse recipe settings known not to work under the active launcher strategy."""
    s, q, t = strategy(), recipe.quantization, recipe.training
    problems = []
    if shards_parameters() and q.load_in_4bit:
        from finetune.model import resolve_compute_dtype

        compute = str(resolve_compute_dtype(q.compute_dtype)).removeprefix("torch.")
        if quant_storage(q) != compute:
            problems.append(
                f"quantization.quant_storage is {q.quant_storage} but {s} shards parameters, which needs the 4-bit "
                f"codes stored in the compute dtype ({compute}); set quantization.quant_storage=auto"
            )
    if s == "fsdp" and t.optimizer == "paged_adamw_8bit":
        problems.append("training.optimizer paged_adamw_8bit fails when FSDP saves its state; use paged_adamw_32bit")
    if problems:
        raise RecipeError(f"The recipe does not fit the {s} launch: " + "; ".join(problems) + ".")


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under accelerate's launcher with `nproc` processes; return its exit code.

    On a machine without CUDA the processes train on CPU over gloo (slow, but the same code path).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune", *argv]
    return subprocess.call(cmd)
