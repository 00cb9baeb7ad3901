"""The checks across sections for quantized bases and QA-LoRA (`quantization.quant_type: gguf`, `lora.use_qalora`),
each naming the key that breaks it. The group size against the model's layer sizes is checked when the model is
built (finetune/model/methods.py), where the sizes are known. Like schema.py, torch-free."""

from __future__ import annotations

from finetune.recipe.section import KeyedError

GGUF_BLOCK = 32  # values per block of GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0


def check_quantized(recipe) -> None:
    q, lora = recipe.quantization, recipe.lora
    gguf_file = recipe.model.name_or_path.endswith(".gguf")
    if q.quant_type == "gguf" and not gguf_file:
        raise KeyedError("quantization.quant_type", f"quantization.quant_type gguf keeps a .gguf file's own quantized "
                         f"tensors, but model.name_or_path '{recipe.model.name_or_path[:80]}' is not a .gguf file; "
                         "name one, or use quant_type nf4 (bitsandbytes 4-bit)")
    if q.cache_dequantized is True and not q.load_in_4bit:
        raise KeyedError("quantization.cache_dequantized", "quantization.cache_dequantized keeps a 4-bit base's "
                         "dequantized weights, but quantization.load_in_4bit is false (the base is not quantized); "
                         "remove it")
    if not lora.use_qalora:
        return
    if lora.use_dora:
        raise KeyedError("lora.use_qalora", "lora.use_qalora cannot be combined with lora.use_dora: DoRA rescales "
                         "whole rows, so the update is no longer constant within a group (PEFT has no such variant)")
    if lora.init not in ("default", "gaussian"):
        raise KeyedError("lora.use_qalora", f"lora.use_qalora cannot be combined with lora.init {lora.init}: that "
                         "init computes a full-width A from the base weights, while QA-LoRA's A reads pooled "
                         "groups; use lora.init default or gaussian")
