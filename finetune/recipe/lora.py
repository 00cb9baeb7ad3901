"""The recipe's `lora` section: rank, alpha and the LoRA variants (rsLoRA, DoRA, PiSSA/OLoRA initialisation,
per-layer targeting, per-module rank and alpha), with the checks that refuse what cannot be trained, merged and
resumed exactly. Like schema.py, it imports neither torch nor transformers."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from finetune.recipe.section import Section

LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq")
# Inits that start from the base weight's principal components (or a LoftQ fit) and rewrite the base
# weight they start from; see `LoraSection._init`.
RESIDUAL_INITS = ("pissa", "olora", "loftq")


class LoraSection(Section):
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A "
                         "((alpha / sqrt(r)) * B @ A with use_rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="`all-linear`, or a list of module names such as [q_proj, v_proj]."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] = Field(default_factory=list, description="Extra modules trained in full and saved.")
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA (arXiv 2312.03732): scale the update by alpha / sqrt(r) instead "
        "of alpha / r, so higher ranks keep learning.",
    )
    use_dora: bool = Field(
        False, description="DoRA (arXiv 2402.09353): W' = m * (W + s B A) / ||W + s B A|| per output row, with "
        "the magnitude vector m trained too (one value per output feature and layer).",
    )
    init: str = Field(
        "default", description="Adapter initialisation: default (A Kaiming-uniform, B = 0), gaussian (A ~ "
        "N(0, 1/r), B = 0); pissa (B A = the top-r SVD of W), pissa_niter_N (randomised SVD, N iterations) "
        "and olora (QR of W) start from W's principal part and train on the residual W - s B A: full-precision "
        "bases only, checkpoints converted to a rank-2r LoRA over the published base; loftq: refused.",
    )
    layers: Optional[Union[list[int], str]] = Field(
        None, description="Decoder layers to adapt: a list of indices [0, 5], a range \"0-11\" (both ends "
        "included) or \"8:\" (8 to the last); default: every layer.",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Module-name pattern (a regex matched at the end of the name, e.g. "
        "`v_proj` or `layers\\.0\\.self_attn\\.q_proj`) -> rank for those modules.",
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Module-name pattern -> alpha for those modules (as rank_pattern).",
    )
    # --- QA-LoRA (docs/quantized.md; finetune/quant/peft_layers.py; checks in recipe/quantized.py)
    use_qalora: bool = Field(
        False, description="QA-LoRA (arXiv 2309.14717, PEFT's use_qalora): the adapter's input is average-pooled "
        "over groups of qalora_group_size inputs before A, so the update is constant within each group: with a "
        "group a multiple of a GGUF Q4_1/Q5_1 block, export folds it exactly into the blocks' offsets.",
    )
    qalora_group_size: int = Field(
        32, ge=1, description="QA-LoRA's group of inputs (PEFT's default is 16; 32 is one GGUF block). Must divide "
        "every adapted layer's input size.",
    )
    # --- end QA-LoRA

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        if v in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9]\d*", v):
            return v
        close = difflib.get_close_matches(v, LORA_INITS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown init '{v}'; expected one of {', '.join(LORA_INITS)} (N: a positive integer).{hint}")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_as_written(cls, v: Any) -> Any:
        """YAML reads an unquoted `8:` as the mapping {8: None}, and `3` as a number: both mean what they say."""
        if isinstance(v, dict) and len(v) == 1 and next(iter(v.values())) is None and isinstance(next(iter(v)), int):
            return f"{next(iter(v))}:"
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if v is None or isinstance(v, list):
            if v is not None and (not v or any(i < 0 for i in v)):
                raise ValueError("list at least one layer index, each >= 0")
            return v
        if not re.fullmatch(r"\d+-\d+|\d+:(\d+)?", v.strip()):
            raise ValueError(f"'{v}' is not a layer range; write \"0-11\" (both ends included), \"8:\" (8 to the "
                             f"last) or a list of indices [0, 5]")
        lo, sep, hi = re.split(r"([-:])", v.strip())
        if hi and int(hi) < int(lo) + (sep == ":"):
            raise ValueError(f"the layer range '{v}' is empty")
        return v.strip()

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns(cls, v: dict) -> dict:
        for pattern, value in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"'{pattern}' is not a valid regular expression ({e})") from None
            if value <= 0:
                raise ValueError(f"'{pattern}': {value} must be positive")
        return v

    def layer_indices(self, num_layers: int) -> Optional[list[int]]:
        """The decoder layer indices `layers` names in a model of `num_layers` layers (None: all)."""
        if self.layers is None:
            return None
        if isinstance(self.layers, list):
            found = sorted(set(self.layers))
        else:
            lo, sep, hi = re.split(r"([-:])", self.layers)
            end = (int(hi) + (sep == "-")) if hi else num_layers
            found = list(range(int(lo), min(end, num_layers)))
        if not found or found[-1] >= num_layers:
            raise ValueError(f"lora.layers {self.layers!r} names layers the model does not have (it has "
                             f"{num_layers}: 0-{num_layers - 1})")
        return found



def check_lora_init(lora: LoraSection, load_in_4bit: bool) -> None:
    """Refuse, before any model loads, the initialisations whose adapter would not be relative to the
    published base weights (so merge could not rebuild the trained model, nor plain PEFT load it)."""
    init = lora.init.split("_niter_")[0]
    if init not in RESIDUAL_INITS:
        return
    if load_in_4bit:
        why = {
            "pissa": "PEFT computes PiSSA's SVD only on float weights and refuses 4-bit ones",
            "olora": "PEFT's OLoRA re-quantizes the residual W - s B A into new NF4 codes, so the adapter is "
                     "relative to weights that exist only inside the training process (neither the published "
                     "base nor its NF4 quantization): merge and plain PEFT could not rebuild the trained model",
            "loftq": "LoftQ must quantize the full-precision model itself (its own NF4 fit of W - s B A), which "
                     "conflicts with loading the base already quantized by bitsandbytes",
        }[init]
        raise ValueError(f"lora.init {lora.init} cannot be combined with quantization.load_in_4bit true: {why}. "
                         f"Use lora.init default or gaussian, or set quantization.load_in_4bit false")
    clashes = [(lora.use_dora, "lora.use_dora", "its magnitude vector has no equivalent in the converted adapter"),
               (bool(lora.modules_to_save), "lora.modules_to_save", "the conversion keeps only LoRA matrices"),
               (lora.bias != "none", "lora.bias", "the conversion keeps only LoRA matrices"),
               (lora.use_rslora and bool(lora.rank_pattern or lora.alpha_pattern), "lora.use_rslora",
                "PEFT cannot convert rsLoRA with rank/alpha patterns")]
    for clash, key, why in clashes:
        if clash and init != "loftq":
            raise ValueError(f"lora.init {lora.init} cannot be combined with {key}: checkpoints of a {init} adapter "
                             f"are converted to a plain LoRA relative to the published base weights, and {why}")
    if init == "loftq":
        raise ValueError("lora.init loftq only makes sense with quantization.load_in_4bit true (it fits the "
                         "adapter to the quantization error), and that combination is refused; use lora.init "
                         "default, gaussian, pissa or olora")
