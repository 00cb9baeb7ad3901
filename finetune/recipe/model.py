"""What to load: the base model (`model`) and how its frozen weights are stored (`quantization`).

Two sections of the recipe (schema.py holds the rest); loaded alone by the verbs that read a checkpoint's saved
recipe (merge, export, eval) without the training sections.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from finetune.recipe.section import PathText, Section


class ModelSection(Section):
    name_or_path: PathText = Field(description="Hub id or local directory of the base model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model.")


PACKED_TYPES = ("gguf", "icq_nf4")  # quant types finetune packs itself (finetune/quant), not bitsandbytes
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="Quantize the frozen base to 4 bit (QLoRA); false = plain LoRA.")
    quant_type: Literal["nf4", "fp4", "gguf", "icq_nf4"] = Field(
        "nf4", description="4-bit data type; gguf (a .gguf model only): keep the file's own quantized tensors "
        "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) as the frozen base, dequantized per forward "
        "(docs/quantized.md); icq_nf4: IR-QLoRA's information-calibrated NF4, NF4 codes of w - tau with one shift "
        "tau per block of 64 chosen for the most code entropy (docs/methods.md; absmax float32, tau float16: "
        "double_quant does not apply).")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype: auto = bf16 on capable CUDA, fp16 on older CUDA; on CPU bf16 where it has AVX512_BF16/AMX, else fp32."
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the packed 4-bit codes are stored in: auto = the compute dtype under FSDP or "
        "DeepSpeed ZeRO-3 (so quantized weights shard), uint8 otherwise."
    )
    cache_dequantized: Union[bool, Literal["auto"]] = Field(
        "auto", description="A 4-bit base keeps each layer's dequantized weight between forwards instead of "
        "dequantizing it in every forward and backward (faster; the memory of a float base in the compute dtype; the "
        "same numbers either way); auto = where `finetune plan` predicts the run still fits with it (an NF4 or FP4 "
        "base: on the CPU only, and within half the memory).")
    packed = property(lambda self: self.load_in_4bit and self.quant_type in PACKED_TYPES,
                      doc="The frozen base is finetune's own QuantLinear layers (gguf, icq_nf4), not bitsandbytes'.")

    @field_validator("compute_dtype", "quant_storage", mode="before")
    @classmethod
    def _alias(cls, v: Any) -> Any:
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v
