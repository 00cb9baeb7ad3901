"""Running one recipe on many processes: which launcher strategy is active, what it requires of the
recipe, and `--nproc` as a shortcut for accelerate's launcher.

Nothing here distributes anything: accelerate (DDP, FSDP, DeepSpeed) and torch.distributed do,
configured by `accelerate launch --config_file recipes/accelerate/<preset>.yaml` or by `torchrun`.
The strategy those launchers set is read once into a `Placement` (placement.py); this module checks
the recipe against it before any model is loaded.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

from finetune.errors import RecipeError
from finetune.recipe import Recipe

if TYPE_CHECKING:  # torch-free at import: `--nproc` only re-launches
    from finetune.model import Placement


def check_strategy(recipe: Recipe, placement: "Placement") -> None:
    """Refuse recipe settings known not to work under the active launcher strategy."""
    s, q, t = placement.strategy, recipe.quantization, recipe.training
    problems = []
    if placement.shards_parameters and q.load_in_4bit and placement.quant_storage != placement.compute_dtype:
        problems.append(
            f"quantization.quant_storage is {q.quant_storage} but {s} shards parameters, which needs the 4-bit "
            f"codes stored in the compute dtype ({str(placement.compute_dtype).removeprefix('torch.')}); set "
            f"quantization.quant_storage=auto"
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
