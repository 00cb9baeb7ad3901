"""The dequantized weight cache (`quantization.cache_dequantized`): a 4-bit base layer keeps its weight dequantized
to the compute dtype between forwards, instead of dequantizing it again at every use.

Why: the base is frozen, yet a training step dequantizes every 4-bit weight twice. bitsandbytes' `Linear4bit` on
a CPU (no fused 4-bit product for training there) forms W = dequantize(codes) for the forward product x W^T and
again in backward for the input gradient g W; finetune's `QuantLinear` (GGUF and ICQ-NF4 bases) does the same.
The cache forms W once, when training starts, and every product reads it: the same W, the same products, so the
same numbers to the bit (tests/test_weight_cache.py), for the memory of a float base in the compute dtype, which
`finetune plan` counts (its "dequantized weight cache" term; auto caches where the run still fits).

For an NF4 (or FP4) `Linear4bit` whose cache holds W_c in its compute dtype c, the forward is bitsandbytes' own
with the dequantization read instead of done:

    forward(x) = (x.to(c) W_c^T + b.to(c)).to(x.dtype),   W_c = dequantize_4bit(codes, state) in c

and autograd keeps W_c (a reference, not a copy) for g W_c. Any call the cache does not fit (another dtype or
device than W_c's, a layer without a compute dtype) takes bitsandbytes' forward. The cached weight is a plain
attribute, not a buffer: DDP broadcasts buffers every step and checkpoints would carry them.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F

from finetune.quant import quant_linears


def cache_weights(model, dtype: torch.dtype | None) -> int:
    """Keep every 4-bit base layer's dequantized weight (finetune's QuantLinear: in `dtype`; bitsandbytes'
    Linear4bit: in its compute dtype, which training sets to `dtype`); None drops them. Returns the bytes kept."""
    total = 0
    for layer in quant_linears(model).values():
        layer.cache(dtype)
        total += layer.cached_weight.numel() * layer.cached_weight.element_size() if dtype is not None else 0
    for layer in _linear4bits(model):
        total += _cache_4bit(layer, dtype is not None)
    return total


def dequantized_bytes(model, dtype: torch.dtype) -> int:
    """What caching every 4-bit base layer's weight in `dtype` would hold (works on a meta-device model)."""
    width = torch.empty((), dtype=dtype).element_size()
    layers = list(quant_linears(model).values()) + _linear4bits(model)
    return sum(m.in_features * m.out_features * width for m in layers)


def _linear4bits(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _cache_4bit(layer, on: bool) -> int:
    layer.__dict__.pop("forward", None)  # back to the class's forward
    layer.__dict__.pop("cached_weight", None)
    if not on or layer.compute_dtype is None:
        return 0
    layer.cached_weight = linear4bit_weight(layer, layer.compute_dtype)
    layer.forward = types.MethodType(_cached_forward, layer)
    return layer.cached_weight.numel() * layer.cached_weight.element_size()


def linear4bit_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """A Linear4bit's weight [out, in] as its forward dequantizes it for an input in `dtype` (bitsandbytes'
    gemm_4bit: the codes dequantized straight to the input's dtype)."""
    import bitsandbytes.functional as bnbf

    state = copy.copy(layer.weight.quant_state)
    state.dtype = dtype
    return bnbf.dequantize_4bit(layer.weight.data, state).reshape(layer.out_features, layer.in_features)


def _cached_forward(self, x: torch.Tensor) -> torch.Tensor:
    w = self.cached_weight
    if w.dtype != self.compute_dtype or w.device != x.device:
        return type(self).forward(self, x)
    bias = None if self.bias is None else self.bias.to(w.dtype)
    return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
