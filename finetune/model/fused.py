"""A LoRA linear layer on CPU as two matrix products and nothing else: y = base(x) + s * drop(x) A^T B^T.

peft's forward for a plain LoRA adapter, `result.clone() + lora_B(lora_A(dropout(x))) * scaling`, spends four
passes over memory around the two small products: the defensive clone of the base output, the dropout's
rescaling of the input, the multiplication by `scaling`, and the addition. In a bf16 step on CPU it adds two
more: it checks `torch.is_autocast_enabled()`, which asks about CUDA, so under CPU autocast it casts the input to
float32 for the adapter and autocast casts it straight back to bf16 for lora_A.

Here the base output takes the adapter's product into its own storage through one in-place `addmm_` (an
out-of-place addmm would first copy it: a pass over [tokens, out] per layer), whose alpha carries both `scaling` and
the dropout's 1 / (1 - p) (finetune.model.dropout.CpuDropout hands over the zeroed input unscaled), so the only
elementwise work left is zeroing the dropped inputs, once per input tensor. The base layer gets the input as 2-D
rows, so its output is a tensor of its own, not a view (autograd would copy a view's base in backward to update it
in place); no backward reads the base output, so updating it in place is safe. B is cast to the output's dtype by
hand, as autocast would for the out-of-place product (it casts no in-place op).
Mathematically the same function as peft's (the scale is applied to the rank-r product instead of the input);
numerically within the dtype's rounding (tests/test_speedups.py).

Sibling layers reading one input (q, k, v; gate, up) go further, as one autograd node per group
(finetune.model.grouped) where their base weights are cached.

Only training steps take it: in eval mode (training's eval, eval, chat, serve's batches mixing adapters, which
peft computes per adapter) peft's forward runs, so that every inference path rounds alike in bf16, where one
addmm and peft's scale-then-add differ by a rounding. Anything else keeps peft's own forward too: DoRA and other
variants, several active adapters, mixed-adapter batches,
merged or disabled adapters, a bias on lora_B, an input whose dtype differs from the adapter's outside autocast.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from finetune.model.dropout import CpuDropout
from finetune.model.grouped import group_siblings


def use_fused_lora(model) -> int:
    """On CPU, give every LoRA `Linear` / `Linear4bit` layer of `model` the fused forward; returns how many.
    A QA-LoRA adapter (a peft variant) still takes peft's forward, per call."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora.bnb import Linear4bit

    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return 0
    fused = set()
    for module in model.modules():  # peft's classes or subclasses keeping their forward (finetune.quant's QA-LoRA)
        if isinstance(module, (LoraLinear, Linear4bit)) and type(module).forward in (LoraLinear.forward,
                                                                                     Linear4bit.forward):
            module.forward = types.MethodType(fused_forward, module)
            fused.add(module)
    group_siblings(model, fused)
    return len(fused)


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    group = self.__dict__.get("lora_group")
    if group is not None:
        out = group.output(self, x, name, lambda m, t: _plain_adapter(m, t, (), {}), _dropped)
        if out is not None:
            return out
    result = self.base_layer(x.reshape(-1, x.shape[-1]))  # 2-D: its own storage, not a view, for addmm_
    dropped, scale = _dropped(self, x)
    low = F.linear(dropped, self.lora_A[name].weight)
    result.addmm_(low.reshape(-1, low.shape[-1]).to(result.dtype), self.lora_B[name].weight.t().to(result.dtype),
                  alpha=self.scaling[name] * scale)
    return result.view(*x.shape[:-1], result.shape[-1])


def _dropped(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """x through the active adapter's dropout, and the scale its kept values still need (CpuDropout leaves it to
    the product)."""
    dropout = self.lora_dropout[self.active_adapters[0]]
    return dropout.dropped(x) if isinstance(dropout, CpuDropout) else (dropout(x), 1.0)


def _plain_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter when it is plain LoRA this forward can compute; None for peft's own forward."""
    if not self.training or args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return None
    name = self.active_adapters[0]
    if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
        return None
    if x.dtype != self.lora_A[name].weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # peft casts the input to the adapter's dtype and back
    return name
