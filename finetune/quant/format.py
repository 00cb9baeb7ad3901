"""The interface every quantized format implements, and the table of formats (`FORMATS`, filled by the format
modules as they are imported: gguf_blocks.py, nf4.py, icq.py).

A weight W (out x in) is quantized in blocks of `block_size` consecutive values along the input dimension (one
row of W splits into in / block_size blocks). Within block b of row o a format stores codes q and per-block
constants; dequantization is  w = d[o, b] * f(q) + m[o, b]  for formats with an offset m (Q4_1, Q5_1) and
w = d[o, b] * f(q) without one (Q4_0, Q5_0, Q8_0, NF4: f is the 16-entry NormalFloat table; ICQ-NF4 adds a
calibrated per-block shift before the table lookup, tau, stored like an offset).

Folding. An update U that is constant within each block (QA-LoRA pools the adapter's input over exactly those
blocks, so B A has that shape once expanded) changes only m:  w + U[o, b] = d f(q) + (m + U[o, b]). The codes
and scales stay byte-identical; the one error left is the rounding of m + U to m's own storage type (fp16 in
GGUF). Formats whose offset is itself quantized (K-quants) or absent (Q4_0, Q8_0, NF4) cannot fold exactly:
`fold` raises FoldError there, and callers re-quantize instead (and say so).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from finetune.errors import ModelError


class FoldError(ModelError):
    """A format without an exact offset was asked to fold an update."""


@dataclass
class Packed:
    """One quantized weight: its format's name, the float shape (out, in) it stands for, and the format's own
    tensors (e.g. GGUF: {"blocks": uint8 (out, in // block_size, bytes per block)}; NF4: codes and absmax)."""
    format: str
    shape: tuple[int, int]
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())


class QuantFormat(ABC):
    name: str  # "q4_1", "nf4", "icq_nf4", ... (GGUF formats: ggml's type name in lower case)
    block_size: int  # values per block along the input dimension
    folds_exactly: bool = False  # `fold` adds a per-block constant into a stored offset

    @abstractmethod
    def pack(self, w: torch.Tensor) -> Packed:
        """Quantize a float weight (out, in); `in` must be a multiple of block_size (ModelError otherwise)."""

    @abstractmethod
    def dequantize(self, p: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in) in `dtype`, computed in torch without Python loops over blocks."""

    def fold(self, p: Packed, delta: torch.Tensor) -> Packed:
        """`p` with `delta` (out, in // block_size) added to every weight of its block, codes and scales kept."""
        raise FoldError(f"{self.name} has no per-block offset to fold an update into; re-quantize instead.")


FORMATS: dict[str, QuantFormat] = {}
# The modules that register formats, imported on the first lookup so that callers need not import them (a module
# not written yet is skipped; an error inside one that exists is raised).
FORMAT_MODULES = ("gguf_blocks", "nf4", "icq")


def register(fmt: QuantFormat) -> QuantFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def load_formats() -> dict[str, QuantFormat]:
    """FORMATS with every format module imported."""
    import importlib
    import importlib.util

    for module in FORMAT_MODULES:
        if importlib.util.find_spec(f"{__package__}.{module}") is not None:
            importlib.import_module(f"{__package__}.{module}")
    return FORMATS


def get_format(name: str) -> QuantFormat:
    """The format called `name`; ModelError naming the known ones otherwise."""
    if name not in FORMATS:
        load_formats()
    if name not in FORMATS:
        raise ModelError(f"Unknown quantized format '{name}': known are {', '.join(sorted(FORMATS)) or 'none'}.")
    return FORMATS[name]
