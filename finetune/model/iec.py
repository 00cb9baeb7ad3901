"""IR-QLoRA's Information Elastic Connection (IEC; arXiv 2402.05445, section 3.2): `lora.use_iec: true`.

Besides A's projection, the adapter's r-dimensional hidden input also receives the layer input averaged over r
equal groups of its features, and B's output also receives that hidden vector repeated over r equal groups of
the output features, each path scaled by a trained scalar (beta_1, beta_2: two parameters per layer, starting at
0, so training starts from the plain LoRA init):

    h = A dropout(x) + beta_1 * G_in x,      y = W x + s (B h + beta_2 * G_out h)

with G_in (r x in) the group means and G_out (out x r) the group repetition, as the authors' implementation does
it (github.com/htqin/IR-QLoRA, utils.py, IRQLoraLinear4bit.forward: the elastic path reads the input before
dropout). Both paths are linear in x, so at evaluation the layer is the plain LoRA

    A' = A + beta_1 G_in,     B' = B + beta_2 G_out,     y = W x + s B' A' x

and that is what a checkpoint's adapter_model.safetensors holds: PEFT, merge, export and serve read it as any
LoRA. Resume restores A, B and the betas themselves (MethodRuntime keeps them in training_state.pt).
r must divide the layer's input and output sizes (checked when the model is built, naming the layer).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraVariant

from finetune.errors import RecipeError
from finetune.model.variants import register

PARAM = "iec_beta"  # {adapter: the two betas}, a plain dict on the layer: the parameters live in variants.register


class IECVariant(LoraVariant):
    """PEFT LoRA variant: the layer's forward with the two elastic paths (PEFT calls `forward` for an adapter
    that has a variant, on float, bitsandbytes 4-bit and QuantLinear layers alike)."""

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        a, b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        beta = getattr(module, PARAM)[active_adapter]
        r = a.out_features
        x = x.to(a.weight.dtype)
        h = a(module.lora_dropout[active_adapter](x)) + beta[0] * x.unflatten(-1, (r, -1)).mean(-1)
        y = b(h) + beta[1] * h.repeat_interleave(b.out_features // r, dim=-1)
        return result + (y * module.scaling[active_adapter]).to(result.dtype)

    @staticmethod
    def folded(module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B'): the plain LoRA the layer computes at evaluation."""
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        beta = getattr(module, PARAM)[adapter].detach().float()
        r, d_in, d_out = a.shape[0], a.shape[1], b.shape[0]
        g_in = torch.eye(r, device=a.device).repeat_interleave(d_in // r, dim=1) / (d_in // r)
        g_out = torch.eye(r, device=b.device).repeat_interleave(d_out // r, dim=0)
        return (a.detach().float() + beta[0] * g_in).to(a.dtype), (b.detach().float() + beta[1] * g_out).to(b.dtype)

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        a, b = IECVariant.folded(module, active_adapter)
        return orig_weight + (module.scaling[active_adapter] * b.float() @ a.float()).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = IECVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        a, b = IECVariant.folded(module, active_adapter)
        return orig_weight - (module.scaling[active_adapter] * b.float() @ a.float()).to(orig_weight.dtype)


def install(model, adapter: str = "default") -> int:
    """Give every LoRA layer of `model` (a PeftModel) the elastic connection: two trainable scalars at 0 and the
    variant's forward. RecipeError naming the first layer whose sizes r does not divide. Returns the layer count."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        r, d_in, d_out = module.r[adapter], module.in_features, module.out_features
        if d_in % r or d_out % r:
            raise RecipeError(f"lora.use_iec: the rank {r} does not divide the sizes of "
                              f"{name.removeprefix('base_model.model.')} ({d_in} in, {d_out} out); IEC averages the "
                              "input over r groups and repeats over r output groups: pick a rank dividing every "
                              "adapted layer's sizes (lora.r, or lora.rank_pattern for that layer).")
        weight = module.lora_A[adapter].weight
        beta = torch.nn.Parameter(torch.zeros(2, dtype=weight.dtype, device=weight.device))
        register(model, name, f"iec_{adapter}", torch.nn.ParameterList([beta]))
        if not hasattr(module, PARAM):
            setattr(module, PARAM, {})  # a plain dict: not registered on the layer
        getattr(module, PARAM)[adapter] = beta
        module.lora_variant[adapter] = IECVariant()
        count += 1
    return count
