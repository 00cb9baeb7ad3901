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
    column norm of W^T), computed against `weight`, the base weights being merged into.
    AdaLoRA: W + (alpha / ranknum) P diag(E) Q. IA3: y = l * (W x) gives W' = diag(l) W (l scales rows), and for a
    feed-forward layer y = W (l * x) gives W' = W diag(l) (columns): PEFT stores l as a column or a row, so W * l."""
    if hasattr(layer, "ia3_l"):
        return weight * layer.ia3_l[adapter].detach().float()
    merged = weight + _delta(layer, adapter)
    if not layer.use_dora.get(adapter, False):
        return merged
    magnitude = layer.lora_magnitude_vector[adapter].weight.detach().float()
    return merged * (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1)


def fold_bias(layer, adapter: str, bias: torch.Tensor) -> torch.Tensor:
    """IA3 scales an output, bias included (y = l * (W x + b)); a feed-forward layer's scaled input leaves b alone."""
    if layer.is_feedforward:
        return bias
    return (bias.float() * layer.ia3_l[adapter].detach().float().reshape(bias.shape)).to(bias.dtype)


def _delta(layer, adapter: str) -> torch.Tensor:
    """s B A in float32; AdaLoRA's 4-bit layer has no get_delta_weight: (alpha / ranknum) P diag(E) Q as its forward."""
    if adapter in getattr(layer, "lora_E", {}) and not hasattr(layer, "get_delta_weight"):
        a, b, e = (getattr(layer, f"lora_{x}")[adapter].detach().float() for x in "ABE")
        return b @ (a * e) * layer.scaling[adapter] / (layer.ranknum[adapter].float() + 1e-5)
    return layer.get_delta_weight(adapter).detach().float()


def is_4bit(module) -> bool:
    """A quantized layer: bitsandbytes 4-bit, or finetune's QuantLinear (GGUF blocks, ICQ-NF4)."""
    import bitsandbytes as bnb

    from finetune.quant import QuantLinear

    return isinstance(module, (bnb.nn.Linear4bit, QuantLinear))


def dequantized(layer) -> torch.Tensor:
    """float32 dequant(quant(W)) of a (LoRA-wrapped) 4-bit layer's weight: the weight training ran on."""
    import bitsandbytes as bnb

    weight = layer.get_base_layer().weight if hasattr(layer, "get_base_layer") else layer.weight
    if not isinstance(weight, bnb.nn.Params4bit):
        return weight.detach().float()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def split_residual(model, adapter: str) -> dict[str, torch.Tensor]:
    """A PiSSA/OLoRA checkpoint holds the converted adapter B' = [B | -B0], A' = [A; A0] (rank 2r, scale s) over
    the published W. Rebuild the model as trained, in place: base W_res = W - s B0 A0 (PEFT's own expression, so
    the same float32 rounding as at initialisation) and the rank-r adapter B A (A0's rows zeroed), so the merge
    reference is the trained model and no large B0 A0 cancels inside the merged weight. Returns s B0 A0 per
    module name, for the merge to subtract from the published weights the same way."""
    from peft.tuners.lora import LoraLayer

    removed = {}
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                r = a.shape[0] // 2
                a0, b0 = a[r:].contiguous(), (-b[:, r:]).contiguous()
                removed[name] = layer.scaling[adapter] * b0 @ a0
                base = layer.get_base_layer().weight
                base.data = base.data - removed[name].to(base.dtype)
                a[r:] = 0
    return removed
