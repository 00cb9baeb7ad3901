"""Tokenizer and base-model loading, 4-bit quantization, LoRA attachment.

QLoRA in one paragraph: the frozen base weights W are stored as 4-bit NF4 codes
(plus per-block scales, themselves quantized when `double_quant` is on) and
dequantized block by block to `compute_dtype` inside each matmul. Only the LoRA
matrices A (r x in) and B (out x r) train, in float32: a target layer computes
    y = dequant(W) x + (alpha / r) * B (A dropout(x))
with B initialised to zero, so training starts from exactly the base model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from finetune.errors import ModelError, RecipeError, first_line
from finetune.placement import Placement, resolve
from finetune.recipe import ModelSection, QuantizationSection, Recipe

# ChatML, for tokenizers that ship no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(model: ModelSection | str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    name, revision, trust = _source(model)
    source, gguf = (Path(name).parent, {"gguf_file": Path(name).name}) if name.endswith(".gguf") else (name, {})
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust, **gguf)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the tokenizer of '{name}': {first_line(e)}") from None
    if chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        # Padding is masked through the attention mask and label masks, never by token id,
        # so reusing EOS as the pad token does not hide the EOS labels.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(q: QuantizationSection, placement: Placement | None = None) -> BitsAndBytesConfig | None:
    if not q.load_in_4bit:
        return None
    placement = placement or resolve(q)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=placement.compute_dtype,
        bnb_4bit_quant_storage=placement.quant_storage,
    )


def load_base_model(model: ModelSection | str, q: QuantizationSection, device: torch.device | str = "cpu",
                    placement: Placement | None = None):
    """The base model on `device`, quantized to 4 bit when the recipe says so (placement: resolved from `q`
    and the launcher's environment unless the caller resolved it already)."""
    name, revision, trust = _source(model)
    if name.endswith(".gguf"):  # dequantized once into a cached transformers directory, then loaded as any other
        from finetune.gguf_in import as_transformers_dir

        name = str(as_transformers_dir(name))
    placement = placement or resolve(q)
    device = torch.device(device)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    # Under FSDP / ZeRO-3 the launcher places (and shards) the weights; every parameter, the 4-bit codes
    # included, must then share one float dtype. Otherwise each process holds a full copy on its device.
    sharded = placement.shards_parameters
    try:
        base = AutoModelForCausalLM.from_pretrained(
            name,
            revision=revision,
            trust_remote_code=trust,
            quantization_config=quantization_config(q, placement),
            dtype=placement.quant_storage if sharded and q.load_in_4bit else placement.compute_dtype,
            device_map=None if sharded else device_map,
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the model '{name}': {first_line(e)}") from None
    base.config.use_cache = False
    _keep_one_cpu_4bit_path(base)
    return base


def _keep_one_cpu_4bit_path(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel the first time
    the layer runs in eval mode without gradients, and keeps using that packing afterwards, in training
    too. An evaluation in the middle of training would then change the training numerics (and the
    eval loss would not measure the trained model). Keep every layer on the plain dequantize path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(base, recipe: Recipe):
    """Freeze the base, prepare it for k-bit training, wrap it with trainable LoRA adapters."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = recipe.training.gradient_checkpointing
    placement = resolve(recipe.quantization)
    # Under FSDP / ZeRO-3 every weight of a wrapped unit must keep the one storage dtype, and
    # prepare_model_for_kbit_training would upcast the norms and embeddings to float32 beside the 4-bit
    # codes stored in bf16: sharded QLoRA skips it (as TRL does) and only enables checkpointing.
    if recipe.quantization.load_in_4bit and not placement.shards_parameters:
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        _frozen_floats_in_compute_dtype(base, placement.compute_dtype, keep=recipe.lora.modules_to_save or [])
    elif checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = get_peft_model(base, lora_config(recipe, base))
    _cpu_dropout(model)
    return model


class CpuDropout(torch.nn.Dropout):
    """LoRA's input dropout on CPU: the same distribution as torch's, about twice as fast, a 1-byte mask.

    torch's CPU dropout draws its mask with a Bernoulli kernel that takes one random double per value
    (outside Intel's MKL path): with an adapter on every linear layer that was a fifth of a bf16 LoRA step
    (docs/performance.md). It then keeps the mask in the input's dtype for backward. Here the mask comes
    from 15-bit random integers, four cut from each random 64-bit word (random_ on int64, from the same
    global generator, which checkpoints save: resume stays exact; a quarter of the generator calls of one
    draw per value): a value is dropped where its integer is below p * 2^15, so p is rounded to a multiple
    of 2^-15 (0.05 -> 0.049988), and kept values are scaled by 1 / (1 - that p), so E[output] = input exactly.
    Autograd keeps the boolean mask (1 byte a value). On GPU, torch's fused dropout is used unchanged."""

    LEVELS = 2**15

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        drop = round(self.p * self.LEVELS)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()  # 63 random bits each
        mask = (words.view(torch.int16)[:n].view(x.shape) & (self.LEVELS - 1)) < drop  # low 15 bits of each quarter
        return x.masked_fill(mask, 0).mul_(self.LEVELS / (self.LEVELS - drop))


def _cpu_dropout(model) -> None:
    """On CPU, every LoRA adapter's dropout becomes a `CpuDropout` of the same p (no weights: checkpoints unchanged)."""
    from peft.tuners.lora import LoraLayer

    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in module.lora_dropout.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    module.lora_dropout[name] = CpuDropout(dropout.p)


def _frozen_floats_in_compute_dtype(model, compute_dtype: torch.dtype, keep: list[str]) -> None:
    """On CPU with bf16 compute, cast back the frozen float weights (embeddings, head, norms) that
    `prepare_model_for_kbit_training` upcast to float32. Under autocast a frozen float32 weight is cast
    to bf16 again at every use (autocast caches only trainable leaves): for SmolLM2's tied 49152 x 576
    head that is 113 MB copied per forward and per backward, which made the bf16 path slower than
    float32 on CPU. The residual stream then runs in bf16, as in a plain bf16 model; LoRA weights (and
    `keep`: the modules_to_save, which train), their gradients and the optimizer state stay float32,
    and the loss is reduced in float32.
    On GPU the cast is cheap next to the matmuls and the QLoRA recipe (float32 norms) is kept."""
    first = next(model.parameters(), None)
    if compute_dtype == torch.float32 or first is None or first.device.type != "cpu":
        return
    for name, p in model.named_parameters():
        trains = any(k in name.split(".") for k in keep)
        if not trains and p.dtype == torch.float32 and type(p).__name__ != "Params4bit":
            p.data = p.data.to(compute_dtype)


def lora_config(recipe: Recipe, model):
    """The recipe's adapters as a peft LoraConfig (also used by `finetune plan` on a meta-device model).

    Variants: rsLoRA scales B A by alpha / sqrt(r) (not alpha / r); DoRA adds a trained magnitude m per
    output row, W' = m * (W + s B A) / ||W + s B A||_row; `layers` maps to PEFT's layers_to_transform, and
    rank_pattern / alpha_pattern give matching modules their own r and alpha (so their own scale)."""
    from peft import LoraConfig

    lora = recipe.lora
    try:
        layers = lora.layer_indices(model.config.get_text_config().num_hidden_layers)
    except ValueError as e:
        raise RecipeError(f"{e}.") from None
    targets = lora.target_modules
    if layers is not None and targets == "all-linear":  # PEFT takes layers_to_transform only with a list
        targets = _linear_layer_names(model)
    init = {"default": True, "gaussian": "gaussian"}.get(lora.init, lora.init)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=init,
        layers_to_transform=layers,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        task_type="CAUSAL_LM",
    )


def _linear_layer_names(model) -> list[str]:
    """Short names of the linear layers inside the decoder layers (what `all-linear` targets there)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", name)}
    return sorted(names)


def check_adapter_dir(adapter_dir: str | Path) -> None:
    """Refuse, with a readable error, a path that is not a PEFT adapter directory (before any model loads)."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelError(f"'{adapter_dir}' is not an adapter directory: it has no adapter_config.json.")
    from finetune.verify import verify_adapter

    verify_adapter(adapter_dir)  # a damaged file is named here, not a safetensors traceback later


def load_adapter_tokenizer(adapter_dir: str | Path, base: ModelSection | str) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer saved with an adapter (chat template included), through `load_tokenizer` as in training.
    A third-party adapter saved without one gets the base model's, with a note saying so ("" otherwise)."""
    if any((Path(adapter_dir) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return load_tokenizer(str(adapter_dir)), ""
    name = base if isinstance(base, str) else base.name_or_path
    return load_tokenizer(base), f"{adapter_dir} has no tokenizer files: used the base model's ({name})"


def _source(model: ModelSection | str) -> tuple[str, str | None, bool]:
    if isinstance(model, str):
        return model, None, False
    return model.name_or_path, model.revision, model.trust_remote_code


def make_optimizer(model, t) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters; paged variants page state to CPU under GPU memory pressure."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    cls = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_torch": torch.optim.AdamW,
    }[t.optimizer]
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)
