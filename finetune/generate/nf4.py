"""The base's own 4-bit weights in the decode step (under FINETUNE_DECODE_WEIGHTS=int8): bitsandbytes' CPU NF4
product, which reads the NF4 codes and block scales as they are (half an int8 copy's bytes), for one-row products of
a projection group where it is measured faster than the int8 copy.

At one row a token's time is the weights' bytes streamed from memory: on a 2-core AMX Xeon the gate/up product's
int8 copy (3.5 MB a layer) takes ~160 us a layer, its NF4 codes ~85, while the smaller q/k/v, o and down products
run faster in int8 (the NF4 kernel's fixed cost; docs/performance.md). The numbers are the trained base's weights
(each block's scale rounded to bf16, as bitsandbytes' own CPU inference rounds it), closer to the exact step than
the int8 copy, which rounds those weights again. An adapter cannot go into 4-bit codes without being lost in their
rounding, so the group's one adapter (the one the int8 copies hold) stays beside them as two float32 products for
the whole group, added into the product's columns: every projection's A stacked ([sum of ranks, in]), then their
s B as one batched product where every projection has the adapter at one rank and width (gate/up: [2, r, out]),
else block-diagonal ([sum of ranks, sum of outs]), stored transposed (a [1, r] x [r, out] product takes 5 us where
F.linear on [out, r] takes 12, AMX Xeon).

bitsandbytes registers this kernel on CPUs with AVX512_BF16 (its `has_avx512bf16`); elsewhere `available` is
False and the int8 copies run every few-row product. It is called through bitsandbytes' native library directly,
with its argument types declared once (`_kernel`) and the weights' addresses kept: its torch op wraps the same call
in ~30 us of Python per product, a tenth of a layer's time at one row, and a ctypes object built per argument cost
~14 us of a 64 us gate/up product.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# NF4 runs a group's one-row products where they take at most this share of the int8 copy's time over every layer
# (`faster`). AMX Xeon, three builds: gate/up 0.75-0.86 (a token 1.06x faster), q/k/v 1.05-1.27 (forced, a token
# 0.94x: its block-diagonal adapter and the kernel's fixed cost at 960 rows)
WIN = 0.95
FORMAT = "_finetune_nf4"  # the attribute of a group's first 4-bit parameter holding the group's NF4 copy


@dataclass
class Nf4:
    """A group's weights (projections reading one input) as bitsandbytes' CPU kernel reads them, stacked by rows."""

    codes: torch.Tensor  # [out, in / 2] uint8: blocks of 32 rows interleaved (`_convert_weight_packed_for_cpu`)
    scales: torch.Tensor  # [in / blocksize, out] bf16: each block's absmax
    blocksize: int
    out_features: int
    in_features: int
    a: torch.Tensor | None = None  # [R, in] float32: the adapter's A of each projection, stacked
    b: torch.Tensor | None = None  # float32 s B^T: [parts, r, out / parts] batched, or [R, out] block-diagonal
    at: tuple[int, int] = field(init=False, repr=False)  # the codes' and the scales' addresses (they never move)

    def __post_init__(self):
        self.at = (self.codes.data_ptr(), self.scales.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, in] bf16 -> [1, out] bf16: x W^T, plus the adapter's (x A^T) (s B)^T where it holds one."""
        out = torch.empty(1, self.out_features, dtype=torch.bfloat16)
        _kernel()(1, self.out_features, self.in_features, x.data_ptr(), *self.at, out.data_ptr(), self.blocksize,
                  x.stride(0), out.stride(0))
        if self.a is not None:  # computed in float32, rounded once into out
            low = F.linear(x.float(), self.a)
            if self.b.dim() == 3:
                out.add_(torch.bmm(low.view(self.b.shape[0], 1, -1), self.b).view(1, -1))
            else:
                out.add_(low.mm(self.b))
        return out


def takes(x: torch.Tensor) -> bool:
    """Whether an input goes to the NF4 kernel: one contiguous bf16 row."""
    return x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.is_contiguous()


@functools.cache
def available() -> bool:
    """Whether bitsandbytes' CPU NF4 product runs here (a CPU with AVX512_BF16, the library's symbol present) and
    gives the dequantized weights' product within bf16's rounding, checked once on a small weight."""
    try:
        import bitsandbytes.functional as bnbf

        if not bnbf.has_avx512bf16() or not hasattr(_lib(), "gemv_4bit_inference_cpu_nf4_bf16"):
            return False
        generator = torch.Generator().manual_seed(0)
        weight = (torch.randn(64, 128, generator=generator) * 0.02).to(torch.bfloat16)
        codes, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        nf4 = _convert([(codes, state)])
        x = torch.randn(1, 128, generator=generator).to(torch.bfloat16)
        want = x.float() @ bnbf.dequantize_4bit(codes, state).float().t()
        return bool(((nf4(x).float() - want).abs().max() <= 0.02 * want.abs().max()).item())
    except Exception:  # noqa: BLE001 (an older or other bitsandbytes, any failure: the int8 copies run these)
        return False


def group_nf4(modules: list, adapter: str | None) -> Nf4 | None:
    """The NF4 copy of projections reading one input (`modules`: PEFT LoRA layers or bitsandbytes Linear4bit), with
    `adapter` beside it where they hold it; the codes kept on the first one's 4-bit parameter. None where a base
    weight is not NF4, the weights differ in width or block size, or their rows (columns) are not whole 32-row
    (scale) blocks."""
    weights = [getattr(m, "base_layer", m).weight for m in modules]
    if not all(type(w).__name__ == "Params4bit" and w.quant_state.quant_type == "nf4" for w in weights):
        return None
    states = [w.quant_state for w in weights]
    if any(st.shape[0] % 32 or st.shape[1] % st.blocksize or st.shape[1] != states[0].shape[1]
           or st.blocksize != states[0].blocksize for st in states):
        return None
    got = getattr(weights[0], FORMAT, None)
    if got is None:
        got = _convert([(w.data, w.quant_state) for w in weights])
        setattr(weights[0], FORMAT, got)
    held = [(i, m) for i, m in enumerate(modules) if adapter is not None and adapter in getattr(m, "lora_A", {})]
    if not held:
        return got
    a = torch.cat([m.lora_A[adapter].weight.detach().float() for _, m in held])
    parts = [(m.lora_B[adapter].weight.detach().float() * m.scaling[adapter]).t() for _, m in held]  # [r_i, out_i]
    if len(held) == len(modules) and len({part.shape for part in parts}) == 1:
        b = torch.stack(parts).contiguous()
    else:
        b = torch.zeros(a.shape[0], got.out_features)
        starts = [sum(st.shape[0] for st in states[:i]) for i in range(len(states))]
        row = 0
        for (i, _), part in zip(held, parts):
            b[row : row + part.shape[0], starts[i] : starts[i] + part.shape[1]] = part
            row += part.shape[0]
    return Nf4(got.codes, got.scales, got.blocksize, got.out_features, got.in_features, a, b)


def faster(int8_products: list, nf4_products: list, x: torch.Tensor) -> bool:
    """Whether the NF4 products of a group, over every layer (so the weights stream from memory, as in a token),
    take at most `WIN` of the int8 copies' time at one row: medians of three passes each, alternating."""
    int8_times, nf4_times = [], []
    for _ in range(3):
        for products, times in ((int8_products, int8_times), (nf4_products, nf4_times)):
            start = time.perf_counter()
            for product in products:
                product(x)
            times.append(time.perf_counter() - start)
    return statistics.median(nf4_times) <= WIN * statistics.median(int8_times)


def _convert(parts: list) -> Nf4:
    """bitsandbytes' NF4 (codes, quant state) pairs, one per weight, to the CPU kernel's layout, stacked by rows
    (the layout interleaves 32-row blocks: stacking whole blocks keeps each weight's rows)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    codes, scales = [], []
    for data, state in parts:
        packed, converted = _convert_weight_packed_for_cpu(data.detach().clone(), copy.deepcopy(state))
        codes.append(packed)
        scales.append(converted.absmax)
    state = parts[0][1]
    return Nf4(torch.cat(codes).contiguous(), torch.cat(scales, dim=1).contiguous(), state.blocksize,
               sum(c.shape[0] for c in codes), state.shape[1])


def _lib():
    from bitsandbytes.cextension import lib

    return lib


@functools.cache
def _kernel():
    """bitsandbytes' CPU NF4 product (n, out, in, x, codes, scales, out, blocksize, x's and out's row strides) as a
    function of declared argument types: Python ints pass straight through. A prototype of its own over the same
    address, so that bitsandbytes' own calls (ctypes objects) are left as they are."""
    proto = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 3)
    return proto(ctypes.cast(_lib().gemv_4bit_inference_cpu_nf4_bf16, ctypes.c_void_p).value)
