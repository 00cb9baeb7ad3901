"""Quantized weight formats, in one place: bitsandbytes' NF4, IR-QLoRA's ICQ-NF4, and GGUF's block formats
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants). Every format is one `QuantFormat` with one interface:

- `pack(w)`: a float weight (out, in) -> `Packed` (the format's own tensors: codes, scales, offsets, raw blocks);
- `dequantize(p, dtype)`: `Packed` -> the float weight, in torch, vectorised (training dequantizes per forward);
- `fold(p, delta)`: add a per-block constant update (out, in // block_size) into the blocks' offsets, where the
  format has one (QA-LoRA's exact merge); formats without an offset say so (`folds_exactly` False).

Training over a packed base (ModuLoRA: LoRA through any quantizer's dequantization), export of folded blocks,
and the quantization-error reports all go through this table, so a new format is one module here.

Modules: format.py (the interface, the table), gguf_blocks.py (GGUF's block formats), linear.py (`QuantLinear`, a
frozen linear layer over a packed weight), peft_layers.py (LoRA on it; QA-LoRA on every kind of base layer).

Imports: errors.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "format": ["FORMATS", "FoldError", "Packed", "QuantFormat", "get_format", "load_formats", "register"],
    "linear": ["QuantLinear", "quant_linears"],
    "peft_layers": ["QALoraVariant", "block_delta", "is_qalora", "wire"],
})
