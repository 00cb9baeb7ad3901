"""NF4 (QLoRA's 4-bit NormalFloat) as a `QuantFormat`, computed in torch exactly as bitsandbytes computes it.

A weight is cut into blocks of 64 consecutive values along the input dimension; each block stores its absolute
maximum s (float32) and, per value, the index q of the nearest of the 16 NormalFloat levels f to w / s
(bitsandbytes' table, quantiles of N(0, 1) scaled to [-1, 1], with an exact 0). Dequantization is w = s * f[q].
Codes are packed two per byte, the first value in the high nibble, as bitsandbytes packs them, so `pack` here and
`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)` give the
same bytes (tests/test_irqlora.py checks it); double quantization of s is bitsandbytes' own business.

The helpers `nf4_codes` and `code_entropy` work on any (..., blocks, 64) tensor at once: ICQ (icq.py) scores
every candidate shift of every block with them in one call.
"""

from __future__ import annotations

import functools

import torch

from finetune.errors import ModelError
from finetune.quant.format import Packed, QuantFormat, register

BLOCK = 64  # bitsandbytes' default block size for 4-bit weights (what transformers' BitsAndBytesConfig uses)


@functools.cache
def nf4_levels() -> torch.Tensor:
    """bitsandbytes' 16 NF4 levels, ascending, float32."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").float()


@functools.cache
def _bounds() -> torch.Tensor:
    levels = nf4_levels()
    return (levels[:-1] + levels[1:]) / 2  # the decision boundaries bitsandbytes bucketizes with


def nf4_codes(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 0..15, absmax float32) of a float tensor (..., n) quantized per last-dimension block:
    bitsandbytes' arithmetic, x * (1 / absmax) clamped to [-1, 1], then the nearest level."""
    blocks = blocks.float()
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    return torch.bucketize(scaled, _bounds().to(blocks.device), out_int32=True).to(torch.uint8), absmax


def code_entropy(codes: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the 16 codes within each last-dimension block: (..., n) -> (...)."""
    counts = torch.zeros(*codes.shape[:-1], 16, device=codes.device)
    counts.scatter_add_(-1, codes.long(), torch.ones_like(codes, dtype=counts.dtype))
    p = counts / codes.shape[-1]
    return -(p * torch.log2(p.clamp(min=1e-30))).sum(-1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in / 2) bytes, the first of each pair in the high nibble."""
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """`pack_nibbles` undone: (out, in / 2) bytes -> (out, in) codes (int64, ready to index a table)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2).long()


def as_blocks(w: torch.Tensor, name: str, block: int = BLOCK) -> torch.Tensor:
    """(out, in) -> (out, in / block, block); ModelError when `in` is not a multiple of the block size."""
    if w.dim() != 2 or w.shape[1] % block:
        raise ModelError(f"{name} quantizes weights whose input size is a multiple of {block}; got a weight of "
                         f"shape {tuple(w.shape)}.")
    return w.reshape(w.shape[0], w.shape[1] // block, block)


class NF4(QuantFormat):
    """bitsandbytes' NF4 without double quantization: codes (out, in / 2) uint8, absmax (out, in / 64) float32."""

    name = "nf4"
    block_size = BLOCK

    def pack(self, w: torch.Tensor) -> Packed:
        codes, absmax = nf4_codes(as_blocks(w, self.name))
        return Packed(self.name, tuple(w.shape), {"codes": pack_nibbles(codes.flatten(1)), "absmax": absmax})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n = p.shape
        values = nf4_levels().to(p.data["codes"].device)[unpack_nibbles(p.data["codes"])]
        return (values.view(out, n // BLOCK, BLOCK) * p.data["absmax"].unsqueeze(-1)).view(out, n).to(dtype)


register(NF4())
