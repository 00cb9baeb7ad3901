"""`QuantLinear`: a frozen linear layer over a packed quantized weight (any `QuantFormat`), dequantized at each use.

forward(x) = x W^T + b with W = format.dequantize(packed, dtype): dtype is the input's (autocast's when autocast is
on), so the matmul is the one a float layer holding W would run. Only the packed tensors live between forwards
(ModuLoRA's point: LoRA trains through any quantizer's dequantization); the backward dequantizes W again for
the input gradient instead of keeping it, as bitsandbytes does for NF4. `cache(dtype)` keeps the dequantized
weight instead (faster, the memory of a float layer): finetune does so only where `finetune plan` says it fits.
Both paths run the same autograd function on the same W, so caching changes no number.

It is an `nn.Linear` (so PEFT's `all-linear`, its default LoRA layer and finetune's layer lists take it as one)
without a weight parameter: `weight` is the dequantized weight in `compute_dtype`, a fresh tensor on every read
(what PEFT's DoRA reads for its weight norm), never a parameter (nothing trains or saves it). The packed tensors
are non-persistent buffers: they move with `.to()` and stay out of state dicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.quant.format import Packed, get_format

PREFIX = "packed_"


class QuantLinear(nn.Linear):
    def __init__(self, packed: Packed, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a float weight
        self.out_features, self.in_features = packed.shape
        self.format = packed.format
        self.compute_dtype = compute_dtype
        self._keys = tuple(packed.data)
        for key, tensor in packed.data.items():
            self.register_buffer(PREFIX + key, tensor, persistent=False)
        self.register_buffer("cached_weight", None, persistent=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @property
    def packed(self) -> Packed:
        return Packed(self.format, (self.out_features, self.in_features),
                      {k: getattr(self, PREFIX + k) for k in self._keys})

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized(self.compute_dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """W in `dtype` (the cached copy when it is in that dtype)."""
        if self.cached_weight is not None and self.cached_weight.dtype == dtype:
            return self.cached_weight
        first = getattr(self, PREFIX + self._keys[0])
        if first.device.type == "meta":
            return torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")
        with torch.no_grad():
            return get_format(self.format).dequantize(self.packed, dtype)

    def cache(self, dtype: torch.dtype | None) -> None:
        """Keep W dequantized in `dtype` between forwards (None: drop the copy)."""
        self.cached_weight = None
        if dtype is not None:
            self.cached_weight = self.dequantized(dtype)

    def packed_blocks_device(self) -> torch.device:
        return getattr(self, PREFIX + self._keys[0]).device

    def packed_bytes(self) -> int:
        return self.packed.nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        return _DequantLinear.apply(x.to(dtype), self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, " \
               f"bias={self.bias is not None}, cached={self.cached_weight is not None}"


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in x's dtype; backward dequantizes W again (or reads the cache)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad.to(ctx.dtype).matmul(ctx.layer.dequantized(ctx.dtype)), None


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
