"""LoRA variants that train more than a checkpoint stores (IR-QLoRA's IEC: iec.py; AdaMix: adamix.py) and the two
things they share: they are installed on a PeftModel after PEFT built its LoRA layers (methods.py's `install_variants`, by
`attach_lora` and by `finetune plan`'s meta model), and a checkpoint holds the plain LoRA they compute at
evaluation (`folded_for_saving` swaps it into lora_A / lora_B while PEFT saves, then puts the trained values back
bit for bit), while training_state.pt keeps the trained parameters themselves for resume (MethodRuntime)."""

from __future__ import annotations

import contextlib

import torch

from finetune.recipe import Recipe


def folds(recipe: Recipe) -> bool:
    """Whether the recipe trains a variant whose checkpoint is a folded plain LoRA."""
    return recipe.adapter.method == "adamix" or (recipe.adapter.method == "lora" and recipe.lora.use_iec)


HOLDER = "variant_parameters"


def register(model, layer_name: str, kind: str, value: torch.nn.Module) -> torch.nn.Module:
    """Register a variant's trainable parameters (`value`, a ParameterList) on the PeftModel itself, not on the LoRA
    layer: PEFT saves everything a LoRA layer holds (its adapter state dict is taken structurally), and these must
    stay out of adapter_model.safetensors, which holds the folded LoRA. The layer keeps a plain reference."""
    if not hasattr(model, HOLDER):
        model.add_module(HOLDER, torch.nn.ModuleDict())
    getattr(model, HOLDER)[f"{kind}__{layer_name.replace('.', '__')}"] = value
    return value


@contextlib.contextmanager
def folded_for_saving(model, adapter: str = "default"):
    """While the block runs, every variant layer's lora_A / lora_B hold the plain LoRA it computes at evaluation."""
    from peft.tuners.lora import LoraLayer

    kept = []
    with torch.no_grad():
        for module in model.modules():
            variant = getattr(module, "lora_variant", {}).get(adapter) if isinstance(module, LoraLayer) else None
            if not hasattr(variant, "folded"):
                continue
            a, b = variant.folded(module, adapter)
            for target, value in ((module.lora_A[adapter].weight, a), (module.lora_B[adapter].weight, b)):
                kept.append((target, target.detach().clone()))
                target.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for target, value in kept:
                target.copy_(value)
