"""LoftQ (arXiv 2310.08659) on a 4-bit base: `lora.init: loftq` with `quantization.load_in_4bit: true`.

QLoRA starts from Q(W) + s B A with B = 0, so the first model already differs from the full-precision one by the
quantization error W - Q(W). LoftQ starts the adapter from a low-rank fit of that error instead, alternating

    Q_t = Q(W - s B_{t-1} A_{t-1}),     s B_t A_t = rank-r SVD of (W - Q_t)         (t = 1 .. T, B_0 A_0 = 0)

so that Q_T + s B_T A_T is as close to W as a rank-r correction can make it (`lora.loftq_iter` = T).

Which base the adapter is relative to, so that merge, export, eval and plain PEFT rebuild the trained model:
- T = 1: Q_1 = Q(W) is exactly the base every 4-bit load of the published model gives, so nothing is written: the
  adapter is a plain LoRA over the published model quantized as the recipe says (as any QLoRA adapter).
- T >= 2: Q_T quantizes W - s B A, not W. The run writes the float weights Q_T dequantized (the "LoftQ base",
  float32 safetensors beside the checkpoints, `loftq_base/`, with its own manifest), loads it with the recipe's
  quantization as training's base, and every checkpoint names it: its recipe.yaml's model, adapter_config.json's
  base_model_name_or_path and adapter_base.json (with the sha256 of the base's manifest). Loading it quantizes
  it again; with the recipe's settings that is Q_T itself, or within double quantization's rounding of it.
In both cases the final B A is fitted against the base as training actually loads it (its dequantized layers, read
back from the loaded model), so step 0 is as close to W as LoftQ gets, whatever the quantizer's rounding.

PEFT's own LoftQ (`LoftQConfig`, `loftq_init`) quantizes on CUDA only, ignores lora_alpha (B A, not s B A, fits
the error) and knows neither double quantization nor other formats; `replace_lora_weights_loftq` is the T = 1
case over bitsandbytes layers. Here the quantizer Q is the recipe's own: bitsandbytes NF4/FP4 (with double
quantization when set) or ICQ-NF4 through its QuantFormat (finetune/quant). A .gguf base (quant_type gguf) is
refused at validation: the file holds only the quantized weights, so there is no W - Q(W) to fit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.errors import CheckpointError
from finetune.recipe import ModelSection, QuantizationSection, Recipe

BASE_DIR = "loftq_base"


def loftq_base_dir(recipe: Recipe) -> Path | None:
    """Where a run keeps its LoftQ base (T >= 2), or None (no LoftQ base: T = 1 or another init)."""
    lora = recipe.lora
    return recipe.run_dir / BASE_DIR if lora.init == "loftq" and lora.loftq_iter > 1 else None


def loftq_trained_section(recipe: Recipe) -> ModelSection:
    """The model section checkpoints record: the LoftQ base where there is one, the recipe's model otherwise."""
    where = loftq_base_dir(recipe)
    return recipe.model if where is None else ModelSection(name_or_path=str(where))


def loftq_trained_base(adapter_dir: str | Path) -> str | None:
    """The LoftQ base an adapter checkpoint was trained over (its adapter_base.json), or None."""
    import json

    record = Path(adapter_dir) / "adapter_base.json"
    try:
        data = json.loads(record.read_text()) if record.is_file() else {}
    except ValueError:
        return None
    return data.get("base") if isinstance(data, dict) and data.get("relative_to") == BASE_DIR else None


def prepare_loftq_base(recipe: Recipe, compute_dtype: torch.dtype, *, write: bool, resuming: bool) -> ModelSection:
    """The model section to load as training's base. T >= 2: a fresh run's main process (`write`) fits Q_T and
    writes the LoftQ base (atomically, with a manifest); a resumed run checks the one it started from."""
    where = loftq_base_dir(recipe)
    if where is None:
        return recipe.model
    if resuming:
        from finetune.artifacts import verify_checkpoint

        verdict = verify_checkpoint(where)
        if not verdict.intact:
            raise CheckpointError(f"Cannot resume: the LoftQ base the run trains on, {where}, is missing or damaged "
                                  f"({'; '.join(verdict.problems)}). Start again with --overwrite.")
    elif write:
        _write_base(recipe, where, compute_dtype)
    return ModelSection(name_or_path=str(where))


def _write_base(recipe: Recipe, where: Path, compute_dtype: torch.dtype) -> None:
    from peft import get_peft_model

    from finetune.artifacts import atomic_dir, write_manifest
    from finetune.model.load import load_tokenizer
    from finetune.model.methods import lora_config

    model = _published_float(recipe)
    quantize = roundtrip(recipe.quantization, compute_dtype)
    with torch.random.fork_rng(devices=[]):  # the layout only: the run's random stream stays as it was
        peft_model = get_peft_model(model, lora_config(_default_init(recipe), model))
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            w = layer.get_base_layer().weight
            q = fit(w.float(), quantize, layer.r["default"], layer.scaling["default"], recipe.lora.loftq_iter)[0]
            w.copy_(q.to(w.dtype))
    model = peft_model.unload()
    with atomic_dir(where, kept="Nothing was trained yet.") as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(recipe.model).save_pretrained(tmp)
        write_manifest(tmp)


def fit(w: torch.Tensor, quantize, rank: int, scaling: float, iters: int):
    """LoftQ's alternation on one float32 weight: (Q_T dequantized, A (r x in), B (out x r)) with
    Q_T + scaling * B A ~ w; `quantize` maps a float weight to its dequantized quantization."""
    correction = torch.zeros_like(w)
    for _ in range(iters):
        q = quantize(w - correction)
        a, b = low_rank(w - q, rank, scaling)
        correction = scaling * b @ a
    return q, a, b


def low_rank(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scaling * B A the best rank-`rank` approximation of `residual` (float32 SVD, the singular
    values split evenly between the two factors, as LoftQ does)."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None] / scaling


def roundtrip(q: QuantizationSection, compute_dtype: torch.dtype):
    """The recipe's quantizer as float -> dequantized float32: bitsandbytes 4-bit (blocks of 64, double quant as
    set, from the compute dtype as a 4-bit load quantizes), or a finetune format (icq_nf4)."""
    if q.quant_type in ("nf4", "fp4"):
        import bitsandbytes.functional as bnbf

        def bnb(w: torch.Tensor) -> torch.Tensor:
            packed, state = bnbf.quantize_4bit(w.to(compute_dtype).contiguous(), blocksize=64,
                                               quant_type=q.quant_type, compress_statistics=q.double_quant)
            return bnbf.dequantize_4bit(packed, state).float()

        return bnb
    from finetune.quant import get_format

    fmt = get_format(q.quant_type)
    return lambda w: fmt.dequantize(fmt.pack(w), torch.float32)


def loftq_initialise(model, recipe: Recipe) -> dict[str, float]:
    """After `attach_lora` on a fresh run: every LoRA layer's A and B := the rank-r fit of W - base, W the
    published float32 weight and base the layer's weight as loaded for training (dequantized to float32).
    Returns {"error_before": ||W - base||_F / ||W||_F, "error_after": ||W - base - s B A||_F / ||W||_F} over all
    adapted layers together."""
    published = dict(_published_float(recipe).named_modules())
    before = after = total = 0.0
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            w = published[name].weight.float()
            base = dequantized(layer.get_base_layer())
            a, b = low_rank(w - base, layer.r["default"], layer.scaling["default"])
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            rest = w - base - layer.scaling["default"] * b @ a
            before, after, total = (before + float((w - base).pow(2).sum()), after + float(rest.pow(2).sum()),
                                    total + float(w.pow(2).sum()))
    return {"error_before": (before / total) ** 0.5, "error_after": (after / total) ** 0.5}


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """The LoRA layers of a PeftModel, by their module name in the plain model (PEFT's prefix removed)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A}


def dequantized(layer) -> torch.Tensor:
    """A base layer's weight as the forward uses it, in float32: bitsandbytes 4-bit, QuantLinear or float."""
    from finetune.quant import QuantLinear

    if isinstance(layer, QuantLinear):
        return layer.dequantized(torch.float32)
    weight = layer.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.detach().float()


def _published_float(recipe: Recipe):
    """The recipe's model in float32 on CPU, unquantized (what LoftQ fits the quantization error of)."""
    from finetune.model.load import load_base_model
    from finetune.model.placement import resolve

    plain = QuantizationSection(load_in_4bit=False, compute_dtype="float32")
    return load_base_model(recipe.model, plain, "cpu", resolve(plain))


def _default_init(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"init": "default"})})
