"""The merged weight of one layer, in float32, from the base weights chosen for the merge.

LoRA: W' = W + s B A, with s = alpha / r (alpha / sqrt(r) with rsLoRA; per module with rank/alpha patterns).
DoRA: W' = m * (W + s B A) / ||W + s B A||, the L2 norm over each output row, so every row of W' has the
trained magnitude m as its norm. W is the weight the merge is into: dequant(quant(W)) for a 4-bit adapter
by default (what training ran on), the published W with `--base-weights original`.
"""

from __future__ import annotations

import torch


def fold(layer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """The merged float32 weight: W + s B A (s = alpha / r, or alpha / sqrt(r) with rsLoRA, per module).
    DoRA: m * (W + s B A) / ||W + s B A||, the L2 norm over each output row (PEFT's weight norm, the paper's
    column norm of W^T), computed against `weight`, the base weights being merged into."""
    merged = weight + layer.get_delta_weight(adapter).detach().float()
    if not layer.use_dora.get(adapter, False):
        return merged
    magnitude = layer.lora_magnitude_vector[adapter].weight.detach().float()
    return merged * (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1)


def is_4bit(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def dequantized(layer) -> torch.Tensor:
    """float32 dequant(quant(W)) of a (LoRA-wrapped) 4-bit layer's weight: the weight training ran on."""
    import bitsandbytes as bnb

    weight = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
    if not isinstance(weight, bnb.nn.Params4bit):
        return weight.detach().float()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
