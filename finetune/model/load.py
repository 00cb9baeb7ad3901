"""Tokenizer and base-model loading, 4-bit quantization, LoRA attachment.

QLoRA in one paragraph: the frozen base weights W are stored as 4-bit NF4 codes
(plus per-block scales, themselves quantized when `double_quant` is on) and
dequantized block by block to `compute_dtype` inside each matmul. Only the LoRA
matrices A (r x in) and B (out x r) train, in float32: a target layer computes
    y = dequant(W) x + (alpha / r) * B (A dropout(x))
with B initialised to zero, so training starts from exactly the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)

from finetune.errors import ModelError, first_line
from finetune.model.dropout import use_cpu_dropout
from finetune.model.fused import use_fused_lora
from finetune.model.methods import install_variants, peft_config
from finetune.model.placement import Placement, compute_like_training
from finetune.recipe import ModelSection, QuantizationSection, Recipe

# ChatML, for tokenizers that ship no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(model: ModelSection | str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    name, revision, trust = _source(model)
    source, gguf = (Path(name).parent, {"gguf_file": Path(name).name}) if name.endswith(".gguf") else (name, {})
    if gguf and Path(name).is_file():
        from finetune.model.gguf_in import check_gguf

        check_gguf(name)
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


def quantization_config(q: QuantizationSection, placement: Placement) -> BitsAndBytesConfig | None:
    if not q.load_in_4bit or q.packed:  # gguf, icq_nf4: finetune's own packed layers (gguf_base.py, icq_base.py)
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=placement.compute_dtype,
        bnb_4bit_quant_storage=placement.quant_storage,
    )


def load_base_model(model: ModelSection | str, q: QuantizationSection, device: torch.device | str,
                    placement: Placement, head: str = "lm"):
    """The base model on `device`, quantized to 4 bit when the recipe says so, as `placement` (resolved once by
    the caller) puts it. `head`: lm (a causal LM), or score (a scalar sequence score for reward models; reward.py)."""
    name, revision, trust = _source(model)
    name, gguf_file = _gguf_source(name, q, placement)
    device = torch.device(device)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
    # Under FSDP / ZeRO-3 the launcher places (and shards) the weights; every parameter, the 4-bit codes
    # included, must then share one float dtype. Otherwise each process holds a full copy on its device.
    sharded = placement.shards_parameters
    icq = q.load_in_4bit and q.quant_type == "icq_nf4"  # quantized from the float32 weights, then cast
    if icq and sharded:
        raise ModelError("quantization.quant_type icq_nf4 does not shard (FSDP / ZeRO-3): run one process per "
                         "device (DDP) or use quant_type nf4.")
    auto, extra = (AutoModelForCausalLM, {}) if head == "lm" else (AutoModelForSequenceClassification, {"num_labels": 1})
    try:
        base = auto.from_pretrained(
            name,
            revision=revision,
            trust_remote_code=trust,
            quantization_config=quantization_config(q, placement),
            dtype=torch.float32 if icq else placement.quant_storage if sharded and q.load_in_4bit
            else placement.compute_dtype,
            device_map=None if sharded else device_map,
            # transformers' hub kernels (on by default where the `kernels` package is, which transformers
            # installs) re-kernelize the model at every train() / eval(), putting back each RMSNorm's own
            # forward over the compiled one (finetune/model/compile.py); they also fetch from the hub.
            use_kernels=False,
            **extra,
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the model '{name}': {first_line(e)}") from None
    base.config.use_cache = False
    if gguf_file and q.load_in_4bit and q.quant_type == "gguf":  # the file's own tensors: the frozen linear weights
        from finetune.model.gguf_base import pack_gguf_base

        pack_gguf_base(base, gguf_file, placement.compute_dtype)
    if icq:  # IR-QLoRA's ICQ-NF4 of every linear layer a 4-bit base quantizes (icq_base.py)
        from finetune.model.icq_base import pack_icq_base

        pack_icq_base(base, placement.compute_dtype)
    _keep_one_cpu_4bit_path(base)
    compute_like_training(base, placement.compute_dtype)
    if head == "score":  # a zero score head: every reward starts at 0 (the first Bradley-Terry loss is log 2)
        torch.nn.init.zeros_(base.score.weight)
        if base.config.pad_token_id is None:  # its pooling needs one (finetune reads the last token itself)
            eos = base.config.eos_token_id
            base.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return base


def _gguf_source(name: str, q: QuantizationSection, placement: Placement) -> tuple[str, str | None]:
    """(what to load: a .gguf file's cached transformers conversion, the GGUF file it comes from, or None)."""
    from finetune.model.gguf_in import as_transformers_dir, source_file

    packs = q.load_in_4bit and q.quant_type == "gguf"
    if name.endswith(".gguf"):  # dequantized once into a cached transformers directory, then loaded as any other
        gguf_file, name = name, str(as_transformers_dir(name))
    else:  # the conversion itself (e.g. merge's base) still trains on the file's own tensors
        gguf_file = source_file(name) if packs else None
    if packs and gguf_file is None:
        raise ModelError(f"quantization.quant_type gguf needs a .gguf model ('{name}' is not one).")
    if packs and placement.shards_parameters:
        raise ModelError("quantization.quant_type gguf does not shard (FSDP / ZeRO-3): run one process per device "
                         "(DDP) or use quant_type nf4.")
    return name, gguf_file


def _keep_one_cpu_4bit_path(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16 kernel the first time
    the layer runs in eval mode without gradients, and keeps using that packing afterwards, in training
    too. An evaluation in the middle of training would then change the training numerics (and the
    eval loss would not measure the trained model). Keep every layer on the plain dequantize path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(base, recipe: Recipe, placement: Placement, masks: str = "positions"):
    """Freeze the base, prepare it for k-bit training, wrap it with the recipe's trainable adapter: LoRA, or the
    PEFT method `adapter.method` names (methods.py builds its config). `masks`: how the run draws LoRA's dropout
    on CPU (dropout.py's MASKS; a resumed run keeps how it began)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = recipe.training.gradient_checkpointing
    # Under FSDP / ZeRO-3 every weight of a wrapped unit must keep the one storage dtype, and
    # prepare_model_for_kbit_training would upcast the norms and embeddings to float32 beside the 4-bit
    # codes stored in bf16: sharded QLoRA skips it (as TRL does) and only enables checkpointing.
    q = recipe.quantization
    if q.load_in_4bit and not q.packed and not placement.shards_parameters:  # gguf, icq_nf4: frozen as a float base
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep = (recipe.lora.modules_to_save or []) + (["score"] if recipe.training.objective == "reward" else [])
        _frozen_floats_in_compute_dtype(base, placement.compute_dtype, keep=keep)  # (a reward model's head trains)
    elif checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = get_peft_model(base, peft_config(recipe, base))
    install_variants(model, recipe)  # IEC, AdaMix (methods.py, variants.py)
    use_cpu_dropout(model, masks)  # CPU: one cheap draw per adapter input
    use_fused_lora(model)  # CPU: each LoRA layer as its two products, nothing elementwise around them
    return model


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
