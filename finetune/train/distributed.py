"""Running one recipe on many processes: which launcher strategy is active, what it requires of the
recipe, FSDP on a CPU-only machine, the optimizer state of a sharded run, and `--nproc` as a shortcut
for accelerate's launcher.

Nothing here distributes anything: accelerate (DDP, FSDP, DeepSpeed) and torch.distributed do,
configured by `accelerate launch --config_file recipes/accelerate/<preset>.yaml` or by `torchrun`.
The strategy those launchers set is read once into a `Placement` (placement.py); this module checks
the recipe and the launch against it before any model is loaded.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import Recipe

if TYPE_CHECKING:  # torch-free at import: `--nproc` only re-launches
    from finetune.model import Placement
    from finetune.train.run import Run


class LaunchError(FinetuneError):
    """The launcher's settings (accelerate config, torchrun flags) cannot run on this machine."""

    exit_code = 2


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
    if placement.fsdp_version == 2 and t.optimizer != "adamw_torch":
        problems.append(
            f"training.optimizer {t.optimizer} runs a bitsandbytes kernel, which has no rule for the sharded "
            f"(DTensor) parameters of FSDP2 (fsdp_version: 2); set training.optimizer=adamw_torch"
        )
    elif s == "fsdp" and t.optimizer == "paged_adamw_8bit":
        problems.append("training.optimizer paged_adamw_8bit fails when FSDP saves its state; use paged_adamw_32bit")
    # Every forward through sharded weights gathers them from all processes, so all must run it together.
    if placement.shards_parameters and t.eval_generate_steps:
        problems.append(
            "training.eval_generate_steps generates on the main process alone, which waits forever for the "
            "others to gather the sharded weights; leave it unset and score the checkpoint with `finetune eval`"
        )
    if placement.shards_parameters and t.objective == "grpo":
        problems.append(
            "training.objective grpo generates a different number of tokens on each process, so the processes "
            "stop gathering the sharded weights at different steps and wait for each other forever; train it "
            "with DDP (--nproc) instead"
        )
    if problems:
        raise RecipeError(f"The recipe does not fit the {s} launch: " + "; ".join(problems) + ".")


def check_launch(placement: "Placement", cpu: bool) -> None:
    """Refuse launcher settings that cannot shard on this machine, before accelerate fails on them with a
    traceback (or, for DeepSpeed on CPU, silently trains unsharded)."""
    if not cpu:
        return
    if placement.fsdp_version == 1:
        raise LaunchError(
            "The accelerate config sets fsdp_version: 1 (or leaves it out), and FSDP1 shards on GPUs only: "
            "accelerate builds each rank's weights on rank 0's device and broadcasts them "
            "(fsdp_sync_module_states, which fsdp_cpu_ram_efficient_loading forces on) and hands FSDP1 its "
            "device as device_id, and torch's FSDP1 takes its compute device from an accelerator. This machine "
            "has none. Launch with recipes/accelerate/fsdp_qlora.yaml, or set fsdp_version: 2 in your config: "
            "FSDP2 shards on CPU over gloo (docs/distributed.md)."
        )
    if placement.strategy == "deepspeed":
        raise LaunchError(
            "The accelerate config sets distributed_type: DEEPSPEED, which accelerate runs on GPUs only: on this "
            "machine it would train every process on a whole copy of the model (plain DDP) without a word. "
            "Launch with recipes/accelerate/fsdp_qlora.yaml (FSDP2, which shards on CPU over gloo) instead."
        )


def fsdp_plugin(placement: "Placement"):
    """accelerate's FSDP plugin as the launcher's environment configures it (FSDP_* variables), or None when the
    launch is not FSDP."""
    if placement.strategy != "fsdp":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def shard_on_cpu(accelerator, plugin) -> None:
    """Make a CPU launch under an FSDP config shard for real.

    accelerate 1.16 routes any launch on a machine without an accelerator to MULTI_CPU (DDP over gloo) and
    drops the FSDP plugin, so the config would silently train unsharded. torch's FSDP runs on CPU over gloo
    (fully_shard defaults to a CPU mesh there), so set the state as accelerate's own GPU branch does
    (AcceleratorState.__init__): the FSDP type, the plugin, its mixed precision; `prepare` then shards."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:  # not launched (one plain process): nothing to shard
        return
    state.distributed_type = DistributedType.FSDP
    if state.mixed_precision != "no" and plugin.mixed_precision_policy is None:
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def gathered_weights(run: "Run") -> dict | None:
    """Under sharding, the whole trainable weights on the main process (every process must call this);
    None where every process holds them whole already (single, DDP)."""
    if run.placement.strategy == "fsdp":  # the adapter only: never gather the frozen (4-bit) base
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(run.model, options=_full(ignore_frozen_params=True))
    return run.accelerator.get_state_dict(run.model) if run.placement.shards_parameters else None


def optimizer_state(run: "Run") -> dict:
    """The optimizer's state to checkpoint (every process must call this). Under FSDP each process holds the
    state of its own shards: gathered into the whole state, keyed by parameter name, on the main process."""
    if run.placement.strategy != "fsdp":
        return run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(run.model, run.optimizer.optimizer, options=_full())


def load_optimizer_state(run: "Run", state: dict) -> None:
    """Resume: `optimizer_state`'s result back into this process's optimizer (under FSDP, its shards of it)."""
    if run.placement.strategy != "fsdp":
        run.optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(run.model, run.optimizer.optimizer, state, options=_full())


def _full(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under accelerate's launcher with `nproc` processes; return its exit code.

    On a machine without CUDA the processes train on CPU over gloo (slow, but the same code path).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune", *argv]
    return subprocess.call(cmd)
