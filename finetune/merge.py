"""`finetune merge`: fold a LoRA adapter into its base model and save a standalone model.

A QLoRA adapter was trained against dequant(quant(W)), not W. Merging it into the
original weights gives W + delta, a model that differs (slightly) from the one
that was trained and evaluated. `base_weights="dequantized"` (the default for a
4-bit recipe) merges into dequant(quant(W)) + delta instead, which reproduces the
trained model's logits up to float rounding. The "merge fidelity" report measures
the largest and mean absolute logit difference against base+adapter on the
quantized model, on a fixed batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from finetune.checkpoint import atomic_dir
from finetune.errors import CheckpointError, ModelError
from finetune.recipe import QuantizationSection

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42. {\"name\": \"Ada\"}"


@dataclass
class MergeReport:
    out: Path
    base: str
    base_weights: str
    dtype: str
    max_abs_logit_diff: float | None
    mean_abs_logit_diff: float | None


def adapter_recipe_quantization(adapter_dir: Path) -> QuantizationSection:
    """The quantization the adapter was trained with (from the recipe saved beside it)."""
    recipe_file = adapter_dir / "recipe.yaml"
    if not recipe_file.is_file():
        return QuantizationSection(load_in_4bit=False)
    return QuantizationSection.model_validate((yaml.safe_load(recipe_file.read_text()) or {}).get("quantization", {}))


def merge(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    base_weights: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
) -> MergeReport:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.model import load_adapter, load_base_model

    adapter_dir, out = Path(adapter_dir), Path(out)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(f"'{adapter_dir}' is not an adapter directory: it has no adapter_config.json.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"Output directory {out} is not empty; pass --overwrite to replace it.")
    base = base or json.loads(config_file.read_text())["base_model_name_or_path"]
    quant = adapter_recipe_quantization(adapter_dir)
    if base_weights == "auto":
        base_weights = "dequantized" if quant.load_in_4bit else "original"
    if base_weights == "dequantized" and not quant.load_in_4bit:
        raise ModelError(f"--base-weights dequantized needs a 4-bit adapter; {adapter_dir} was trained without quantization.")

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    probe = tok([PROBE_TEXT], return_tensors="pt")
    # Reference: base + adapter exactly as trained (quantized when the recipe was QLoRA), on CPU.
    trained = load_adapter(load_base_model(base, quant, "cpu"), adapter_dir)
    with torch.no_grad():
        reference = trained(**probe).logits.float()
    dequantized = _dequantized_weights(trained) if base_weights == "dequantized" else {}
    del trained

    try:
        full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as e:
        raise ModelError(f"Cannot load the base model '{base}': {str(e).splitlines()[0]}") from None
    target_dtype = full.config.dtype if dtype == "auto" else getattr(torch, dtype)
    with torch.no_grad():
        for name, weight in dequantized.items():
            full.get_submodule(name).weight.copy_(weight)
    merged = PeftModel.from_pretrained(full, str(adapter_dir)).merge_and_unload()
    with torch.no_grad():
        diff = (merged(**probe).logits.float() - reference).abs()
    merged = merged.to(target_dtype)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return MergeReport(
        out=out, base=base, base_weights=base_weights, dtype=str(target_dtype).removeprefix("torch."),
        max_abs_logit_diff=diff.max().item(), mean_abs_logit_diff=diff.mean().item(),
    )


def _dequantized_weights(model) -> dict[str, torch.Tensor]:
    """Float32 dequant(quant(W)) of every 4-bit linear layer, keyed by its name in the plain model."""
    import bitsandbytes as bnb

    weights = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            weights[name.replace(".base_layer", "")] = w
    return weights
