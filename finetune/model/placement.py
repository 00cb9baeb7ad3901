"""Where and in what precision a run computes, resolved once: compute dtype, 4-bit storage dtype, launch strategy.

Everything that depends on the hardware or on the launcher is decided here, from the recipe's
`quantization` section and the environment `accelerate launch` / `torchrun` set, and passed down
as one `Placement`. model.py (loading), distributed.py (strategy checks), plan.py and train.py
read it; none of them asks the environment again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from finetune.recipe import QuantizationSection

STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class Placement:
    compute_dtype: torch.dtype  # matmul dtype of the frozen 4-bit weights (and autocast's)
    quant_storage: torch.dtype  # dtype the packed 4-bit codes are stored in
    strategy: str  # single | ddp | fsdp | deepspeed
    shards_parameters: bool  # FSDP or ZeRO-3: the launcher places and shards the weights
    fsdp_version: int | None = None  # under FSDP: 1 (FlatParameter wrappers) or 2 (per-parameter DTensor shards)

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for autocast in the compute dtype."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute_dtype, "no")


def resolve(q: QuantizationSection) -> Placement:
    """The run's placement under the active launcher (read from the environment)."""
    s = strategy()
    shards = s == "fsdp" or (s == "deepspeed" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
    compute = resolve_compute_dtype(q.compute_dtype)
    # FSDP and ZeRO-3 can only shard float tensors, and every parameter of a wrapped unit must share one
    # dtype, so there the 4-bit codes are stored in the compute dtype.
    storage = q.quant_storage if q.quant_storage != "auto" else ("compute" if shards else "uint8")
    version = int(os.environ.get("FSDP_VERSION", "1")) if s == "fsdp" else None  # accelerate's fsdp_version
    return Placement(compute, compute if storage == "compute" else getattr(torch, storage), s, shards, version)


def strategy() -> str:
    """`fsdp`, `deepspeed`, `ddp` (several processes, plain data parallel) or `single`."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def resolve_compute_dtype(name: str, facts: "DeviceFacts | None" = None) -> torch.dtype:
    """The recipe's `compute_dtype` as a torch dtype; `auto` is decided by `auto_compute_dtype`."""
    if name != "auto":
        return getattr(torch, name)
    return auto_compute_dtype(facts or DeviceFacts.probe())


@dataclass(frozen=True)
class DeviceFacts:
    """What `compute_dtype: auto` looks at, gathered in one place so the rule can be tested with faked facts."""
    cuda: bool = False
    cuda_bf16: bool = False  # compute capability >= 8.0 (Ampere and newer)
    cpu_native_bf16: bool = False  # AVX512_BF16 or AMX_BF16
    cpu_override: str | None = None  # FINETUNE_CPU_DTYPE

    @classmethod
    def probe(cls) -> "DeviceFacts":
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                   cpu_native_bf16=cpu_has_native_bf16(), cpu_override=cpu_dtype_override())


def auto_compute_dtype(facts: DeviceFacts) -> torch.dtype:
    """`auto`: bf16 on a CUDA device that supports it, fp16 on older CUDA; on CPU, what FINETUNE_CPU_DTYPE says,
    else bf16 where the CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16), fp32 otherwise.

    The CPU rule is measured (docs/performance.md): with AVX512_BF16 a bf16 GEMM runs ~2.8x the fp32 rate
    (AMX ~3.9x) and the quickstart trains faster in bf16 with ~35% less peak memory; without it (AVX2 or plain
    AVX-512) bf16 matmuls are emulated and ~25x slower than fp32. The override makes any machine compute like
    another kind (tests run both legs on every machine; a user reproduces a colleague's run).
    """
    if facts.cuda:
        return torch.bfloat16 if facts.cuda_bf16 else torch.float16
    if facts.cpu_override:
        return getattr(torch, facts.cpu_override)
    return torch.bfloat16 if facts.cpu_native_bf16 else torch.float32


CPU_DTYPE_ENV = "FINETUNE_CPU_DTYPE"
CPU_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}


def cpu_dtype_override() -> str | None:
    """FINETUNE_CPU_DTYPE=bfloat16|float32 (also bf16, fp32), or None when unset or empty; anything else is a
    RecipeError naming the variable."""
    value = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if not value:
        return None
    if value.lower() not in CPU_DTYPES:
        from finetune.errors import RecipeError

        raise RecipeError(f"{CPU_DTYPE_ENV}={value!r}: expected bfloat16 or float32 (or unset: the CPU decides). It "
                          "overrides what `quantization.compute_dtype: auto` picks on a CPU.")
    return CPU_DTYPES[value.lower()]


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX-BF16 instructions (as PyTorch's CPU dispatch sees them)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def compute_like_training(model, dtype: torch.dtype):
    """`model` with its forward under autocast in the compute dtype, as accelerate runs the trained model's
    forward. Done to the transformers model as it loads (load_base_model), so float32 adapter weights (LoRA, IA3's
    vectors) meet the bf16 activations as in training in eval, chat, serve and every generation (PEFT's generate
    calls that forward), and a float32 vector scaling bf16 keys cannot leave attention with mixed dtypes; and to
    the adapter-wrapped model whose loss eval measures, so what PEFT computes outside the base model (a prompt
    encoder's virtual tokens) runs as in training too. A float32 model is returned as it is."""
    if dtype == torch.float32 or model.__dict__.get("_finetune_autocast") == dtype:  # (not a wrapped module's)
        return model
    device = next(model.parameters()).device.type
    model.forward = torch.autocast(device, dtype=dtype)(model.forward)
    model._finetune_autocast = dtype
    return model


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
