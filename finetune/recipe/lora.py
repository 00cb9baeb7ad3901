"""The recipe's `lora` section: rank, alpha and the LoRA variants (rsLoRA, DoRA, PiSSA/OLoRA initialisation,
per-layer targeting, per-module rank and alpha), with the checks that refuse what cannot be trained, merged and
resumed exactly. Like schema.py, it imports neither torch nor transformers."""

from __future__ import annotations

import difflib
import re
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from finetune.recipe.section import KeyedError, Section

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
        "bases only, checkpoints converted to a rank-2r LoRA over the published base; loftq (4-bit bases: "
        "load_in_4bit true): B A starts as the rank-r fit of the quantization error W - Q(W) (loftq_iter).",
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
    # -- mixture of experts (Mixtral, Qwen3-MoE, OLMoE): check_experts below, finetune/model/moe.py
    target_experts: bool = Field(
        False, description="Mixture-of-experts models: also train LoRA on the experts (PEFT's target_parameters on "
        "the fused expert tensors: a rank-r pair per expert and projection). Needs lora.dropout 0, no DoRA and "
        "init default or gaussian (PEFT's expert wrapper has none of them).",
    )
    train_router: bool = Field(
        False, description="Mixture-of-experts models: train each layer's router (its experts x hidden gate) in "
        "full; frozen by default.",
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
    # --- LoftQ on a 4-bit base, IR-QLoRA's elastic connection (model/loftq.py, model/iec.py; recipe/qmethods.py)
    loftq_iter: int = Field(
        1, ge=1, le=100, description="lora.init loftq: LoftQ's alternating steps T (PEFT's loftq_iter). 1: B A fits "
        "the error of the recipe's quantization of the published weights, which stay the base; T >= 2 also moves "
        "the quantized base (Q(W - s B A)), written beside the checkpoints as loftq_base/.",
    )
    use_iec: bool = Field(
        False, description="IR-QLoRA's Information Elastic Connection (arXiv 2402.05445): A also receives the input "
        "averaged over r groups and B's output gets its input repeated over out / r groups, each scaled by a "
        "trained scalar (2 per layer, starting at 0). Linear, so checkpoints fold it into a plain LoRA. r must "
        "divide every adapted layer's input and output sizes.",
    )
    # --- end LoftQ / IEC

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
    if init == "loftq":  # the other LoftQ checks (gguf bases, DoRA, loftq_iter): recipe/qmethods.py
        if not load_in_4bit:
            raise ValueError("lora.init loftq fits the adapter to the quantization error of a 4-bit base, and "
                             "quantization.load_in_4bit is false (no quantization error); set load_in_4bit true, "
                             "or use lora.init default, gaussian, pissa or olora")
        return
    if load_in_4bit:
        why = {
            "pissa": "PEFT computes PiSSA's SVD only on float weights and refuses 4-bit ones",
            "olora": "PEFT's OLoRA re-quantizes the residual W - s B A into new NF4 codes, so the adapter is "
                     "relative to weights that exist only inside the training process (neither the published "
                     "base nor its NF4 quantization): merge and plain PEFT could not rebuild the trained model",
        }[init]
        raise ValueError(f"lora.init {lora.init} cannot be combined with quantization.load_in_4bit true: {why}. "
                         f"Use lora.init default or gaussian, or set quantization.load_in_4bit false")
    clashes = [(lora.use_dora, "lora.use_dora", "its magnitude vector has no equivalent in the converted adapter"),
               (bool(lora.modules_to_save), "lora.modules_to_save", "the conversion keeps only LoRA matrices"),
               (lora.bias != "none", "lora.bias", "the conversion keeps only LoRA matrices"),
               (lora.use_rslora and bool(lora.rank_pattern or lora.alpha_pattern), "lora.use_rslora",
                "PEFT cannot convert rsLoRA with rank/alpha patterns")]
    for clash, key, why in clashes:
        if clash:
            raise ValueError(f"lora.init {lora.init} cannot be combined with {key}: checkpoints of a {init} adapter "
                             f"are converted to a plain LoRA relative to the published base weights, and {why}")


# ------------------------------------------------------------------ mixture of experts (issue 34)

# The experts' projection names in transformers' (v4-style, on-disk) checkpoints, and the router's: PEFT would
# re-route a target_modules entry naming them to the fused expert tensors or the router (its v4 -> v5 conversion),
# so on a mixture of experts they are asked for by lora.target_experts / lora.train_router instead.
EXPERT_MODULE_NAMES = {"mixtral": ("w1", "w2", "w3", "gate"), "default": ("gate_proj", "up_proj", "down_proj", "gate")}
# The train-able inits: the others read or rewrite the base weight, which PEFT's expert wrapper does not support.
EXPERT_INITS = ("default", "gaussian")


def local_model_config(name_or_path: str) -> dict | None:
    """The model's config.json when the model is a local directory (None: a hub id or a GGUF file)."""
    path = Path(name_or_path).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def num_experts(config: dict) -> int:
    """Experts per layer of a transformers config (0: a dense model)."""
    text = config.get("text_config") or config
    return int(text.get("num_local_experts") or text.get("num_experts") or 0)


def check_experts(recipe) -> None:
    """Refuse, naming the key, what PEFT cannot train on a mixture of experts: its expert wrapper
    (lora.ParamWrapper) adds B A to the fused expert weights themselves, so there is no input to drop out, no
    DoRA magnitude and no initialisation from the weights; and the MoE settings on a model without experts."""
    lora = recipe.lora
    if lora.target_experts:
        why = "PEFT's expert wrapper (lora.ParamWrapper) adds B A to the expert weights themselves"
        clashes = [
            (lora.dropout > 0, "lora.dropout", f"lora.dropout {lora.dropout} cannot be combined with "
             f"lora.target_experts true: {why}, so no dropout can apply to an input (one lora.dropout serves every "
             "target); set lora.dropout 0"),
            (lora.use_dora, "lora.use_dora", f"lora.use_dora cannot be combined with lora.target_experts true: {why} "
             "and has no DoRA magnitude; set lora.use_dora false"),
            (lora.init not in EXPERT_INITS, "lora.init", f"lora.init {lora.init} cannot be combined with "
             f"lora.target_experts true: {why} and initialises only as default or gaussian"),
        ]
        for clash, key, message in clashes:
            if clash:
                raise KeyedError(key, message)
    config = local_model_config(recipe.model.name_or_path)
    if config is None:
        return  # a hub id: checked when the model loads (finetune/model/moe.py)
    experts = num_experts(config)
    asked = [k for k, on in (("lora.target_experts", lora.target_experts), ("lora.train_router", lora.train_router),
                             ("training.router_aux_loss_coef", recipe.training.router_aux_loss_coef is not None)) if on]
    if not experts:
        if asked:
            raise KeyedError(asked[0], f"{asked[0]} is a mixture-of-experts setting, and {recipe.model.name_or_path} "
                             f"({config.get('model_type', '?')}) has no experts; remove it")
        return
    if recipe.adapter.method != "lora":
        raise KeyedError("adapter.method", f"adapter.method {recipe.adapter.method} cannot train the mixture-of-"
                         f"experts model {config.get('model_type', '?')}: on these models finetune trains LoRA (PEFT's "
                         "expert and router support is LoRA's); use adapter.method lora")
    names = EXPERT_MODULE_NAMES.get(config.get("model_type"), EXPERT_MODULE_NAMES["default"])
    listed = [t for t in (lora.target_modules if isinstance(lora.target_modules, list) else []) if t in names]
    if listed:
        raise KeyedError("lora.target_modules", f"lora.target_modules names {listed[0]}, which in this mixture of "
                         f"experts is {'the router' if listed[0] == 'gate' else 'an expert projection'} (fused into one "
                         "tensor per layer); use lora.target_experts true (LoRA on every expert) or lora.train_router "
                         "true (the routers in full), and list only attention modules here")

