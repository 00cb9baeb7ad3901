"""GGUF's block formats as `QuantFormat`s: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32) and the K-quants llama.cpp
writes by default, Q4_K, Q5_K, Q6_K (super-blocks of 256).

A weight (out, in) is stored as `Packed(data={"blocks": uint8 (out, in // block_size, bytes per block)})`: the
file's own bytes, row by row, so a tensor read from a .gguf file is packed without touching a byte. Dequantizing
is the `gguf` package's numpy reference (gguf/quants.py) written in torch on whole tensors: the same float32
operations in the same order, so the values are bit-identical to it (tests/test_quantized_base.py checks every
format against it) and to what transformers and llama.cpp read from the file.

Packing a float weight uses gguf's numpy quantizers (Q4_0 ... Q8_0; it has none for the K-quants, which are only
read). Folding: Q4_1 and Q5_1 store each block as x = d * q + m with m in fp16, so a per-block constant update
goes into m (rounded to fp16: the only error) with d and the codes untouched. Q4_0, Q5_0 and Q8_0 have no m;
the K-quants store their offsets as 6-bit multiples of a per-super-block dmin, so an arbitrary update cannot go
into them exactly: those raise FoldError.
"""

from __future__ import annotations

import numpy as np
import torch

from finetune.errors import ModelError
from finetune.quant.format import FoldError, Packed, QuantFormat, register

QK_K = 256  # values per K-quant super-block


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 number at bytes [start, start + 2) of each block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """4-bit codes: for each of `groups` runs of `width` bytes, the low nibbles then the high ones (n, groups * 2 *
    width), as gguf's `qs.reshape(n, groups, 1, width) >> [0, 4]` lays them out."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, width)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, groups * 2 * width)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """Bit i of the little-endian bytes qh (n, k) for i in 0 .. 8k - 1: (n, 8k) of 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)


class GGUFBlocks(QuantFormat):
    """One ggml block type; `_values` turns blocks (n, bytes per block) into float32 values (n, block_size)."""
    offset_at: int | None = None  # byte offset of the fp16 per-block offset m (formats that fold exactly)

    def __init__(self, name: str, block_size: int, type_size: int):
        self.name, self.block_size, self.type_size = name, block_size, type_size
        self.folds_exactly = self.offset_at is not None

    @property
    def ggml_type(self):
        import gguf

        return gguf.GGMLQuantizationType[self.name.upper()]

    def pack(self, w: torch.Tensor) -> Packed:
        import gguf

        out, n_in = w.shape
        if n_in % self.block_size:
            raise ModelError(f"A weight with rows of {n_in} values does not split into {self.name} blocks of "
                             f"{self.block_size}.")
        try:
            raw = gguf.quants.quantize(w.detach().float().cpu().numpy(), self.ggml_type)
        except NotImplementedError:
            raise ModelError(f"gguf has no {self.name} quantizer (it only reads K-quants); use a file llama.cpp "
                             "wrote.") from None
        return self.from_raw(raw, (out, n_in))

    def from_raw(self, raw, shape: tuple[int, int]) -> Packed:
        """The file's bytes of a tensor (rows, bytes per row; numpy or torch uint8) as a Packed weight."""
        blocks = torch.as_tensor(np.ascontiguousarray(raw) if isinstance(raw, np.ndarray) else raw)
        blocks = blocks.reshape(shape[0], shape[1] // self.block_size, self.type_size)
        return Packed(self.name, (int(shape[0]), int(shape[1])), {"blocks": blocks})

    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        blocks = p.data["blocks"]
        values = self._values(blocks.reshape(-1, self.type_size))
        return values.reshape(p.shape).to(dtype)

    def _values(self, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fold(self, p: Packed, delta: torch.Tensor) -> Packed:
        """m + delta rounded to fp16, per block; d and the codes byte for byte as they were."""
        if self.offset_at is None:
            return super().fold(p, delta)
        blocks = p.data["blocks"]
        if tuple(delta.shape) != tuple(blocks.shape[:2]):
            raise ModelError(f"A {self.name} fold needs one update per block {tuple(blocks.shape[:2])}, got "
                             f"{tuple(delta.shape)}.")
        at = self.offset_at
        m = blocks[..., at:at + 2].contiguous().view(torch.float16).float()
        folded = (m + delta.float().unsqueeze(-1)).to(torch.float16)
        out = blocks.clone()
        out[..., at:at + 2] = folded.view(torch.uint8)
        return Packed(p.format, p.shape, {"blocks": out})

    def offsets(self, p: Packed) -> torch.Tensor:
        """The per-block offsets m (out, in // block_size) as float32 (formats that fold only)."""
        at = self.offset_at
        return p.data["blocks"][..., at:at + 2].contiguous().view(torch.float16).float().squeeze(-1)


class _Q4_0(GGUFBlocks):
    def _values(self, b):
        return _f16(b, 0) * (_nibbles(b[:, 2:], 1, 16).to(torch.int8) - 8).float()


class _Q4_1(GGUFBlocks):
    offset_at = 2

    def _values(self, b):
        return _f16(b, 0) * _nibbles(b[:, 4:], 1, 16).float() + _f16(b, 2)


class _Q5_0(GGUFBlocks):
    def _values(self, b):
        q = _nibbles(b[:, 6:], 1, 16) | (_bits(b[:, 2:6]) << 4)
        return _f16(b, 0) * (q.to(torch.int8) - 16).float()


class _Q5_1(GGUFBlocks):
    offset_at = 2

    def _values(self, b):
        q = _nibbles(b[:, 8:], 1, 16) | (_bits(b[:, 4:8]) << 4)
        return _f16(b, 0) * q.float() + _f16(b, 2)


class _Q8_0(GGUFBlocks):
    def _values(self, b):
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scales and mins packed in 12 bytes (gguf's Q4_K.get_scale_min)."""
    n = scales.shape[0]
    d, m, m_d = scales.reshape(n, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mins


class _Q4_K(GGUFBlocks):
    def _values(self, b):
        n = b.shape[0]
        sc, mins = _scale_min_k4(b[:, 4:16])
        d = (_f16(b, 0) * sc.float()).reshape(n, -1, 1)
        dm = (_f16(b, 2) * mins.float()).reshape(n, -1, 1)
        q = _nibbles(b[:, 16:], 4, 32).reshape(n, -1, 32).float()
        return (d * q - dm).reshape(n, QK_K)

    def fold(self, p, delta):
        raise FoldError("q4_k stores its block offsets as 6-bit multiples of one dmin per 256 values, so an update "
                        "cannot be folded into them exactly; re-quantize instead.")


class _Q5_K(GGUFBlocks):
    def _values(self, b):
        n = b.shape[0]
        sc, mins = _scale_min_k4(b[:, 4:16])
        d = (_f16(b, 0) * sc.float()).reshape(n, -1, 1)
        dm = (_f16(b, 2) * mins.float()).reshape(n, -1, 1)
        ql = _nibbles(b[:, 48:], 4, 32).reshape(n, -1, 32)
        qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device)
               .reshape(1, 1, 8, 1)) & 1).reshape(n, -1, 32)
        return (d * (ql | (qh << 4)).float() - dm).reshape(n, QK_K)

    fold = _Q4_K.fold


class _Q6_K(GGUFBlocks):
    def _values(self, b):
        n = b.shape[0]
        scales = b[:, 192:208].contiguous().view(torch.int8).float()
        d = (_f16(b, 208) * scales).reshape(n, QK_K // 16, 1)
        ql = _nibbles(b[:, :128], 2, 64).reshape(n, -1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
        qh = ((b[:, 128:192].reshape(n, -1, 1, 32) >> shifts) & 3).reshape(n, -1, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
        return (d * q).reshape(n, QK_K)


# (name, class, values per block, bytes per block): gguf.GGML_QUANT_SIZES, checked in the tests
for _name, _cls, _bs, _ts in [("q4_0", _Q4_0, 32, 18), ("q4_1", _Q4_1, 32, 20), ("q5_0", _Q5_0, 32, 22),
                              ("q5_1", _Q5_1, 32, 24), ("q8_0", _Q8_0, 32, 34), ("q4_k", _Q4_K, QK_K, 144),
                              ("q5_k", _Q5_K, QK_K, 176), ("q6_k", _Q6_K, QK_K, 210)]:
    register(_cls(_name, _bs, _ts))
