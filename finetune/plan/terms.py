"""The terms of the memory plan (memory.py's docstring states each): the recipe's model on the meta device, then
bytes of weights, adapters, optimizer state, activations and working buffers, and on CPU the runtime."""

from __future__ import annotations

import math
import re
from pathlib import Path

from finetune.errors import FinetuneError, first_line
from finetune.plan.moe import expert_lora_bytes, moe_token_bytes
from finetune.recipe import Recipe

BLOCK = 64  # bitsandbytes 4-bit blocksize
NESTED_BLOCK = 256  # blocksize of the double-quantized absmax values
MIN_8BIT_SIZE = 4096  # bitsandbytes 8-bit optimizers keep smaller tensors in 32 bit


def meta_model(recipe: Recipe, placement):
    """The recipe's model as training builds it (4-bit layers, LoRA adapters) on the meta device,
    and the dtype its checkpoint stores."""
    import torch

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.model import quantization_config

    m = recipe.model
    if m.name_or_path.endswith(".gguf"):  # its config, read by transformers' GGUF reader (no weights loaded)
        m = m.model_copy(update={"name_or_path": str(Path(m.name_or_path).parent)})
        gguf = {"gguf_file": Path(recipe.model.name_or_path).name}
    else:
        gguf = {}
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                            **gguf)
    except (OSError, ValueError) as e:
        raise FinetuneError(f"Cannot read the config of '{m.name_or_path}': {first_line(e)}") from None
    stored = getattr(config, "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    if gguf:  # its float32 conversion (finetune/model/gguf_in.py), and with quant_type gguf the file's own blocks
        config.__dict__.pop("quantization_config", None)
        stored = torch.float32
    auto = AutoModelForCausalLM
    if recipe.training.objective == "reward":  # a reward model: the body with a one-output score head
        from transformers import AutoModelForSequenceClassification as auto

        config.num_labels = 1
    with init_empty_weights():
        model = auto.from_config(config, dtype=placement.compute_dtype, trust_remote_code=m.trust_remote_code)
    model.tie_weights()  # from_config leaves tied embeddings as two tensors on the meta device
    if gguf and recipe.quantization.load_in_4bit and recipe.quantization.quant_type == "gguf":
        from finetune.model import pack_gguf_base

        pack_gguf_base(model, recipe.model.name_or_path, placement.compute_dtype)  # shapes and formats only
    if recipe.quantization.load_in_4bit and recipe.quantization.quant_type == "icq_nf4":
        from finetune.model import pack_icq_base

        pack_icq_base(model, placement.compute_dtype)  # shapes only, on the meta device
    q = quantization_config(recipe.quantization, placement)
    if q is not None:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = get_keys_to_not_convert(model) + list(q.llm_int8_skip_modules or [])
        model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=q)
    from peft import get_peft_model

    from finetune.model import peft_config

    for p in model.parameters():
        p.requires_grad_(False)
    # DoRA's, PiSSA's, OLoRA's and a text-initialised soft prompt's inits read real weights; the shapes are those
    # of the default init, and DoRA's magnitudes are counted by `dora_magnitudes`
    plain = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"use_dora": False, "init": "default"}),
                                      "prompt_tuning": recipe.prompt_tuning.model_copy(update={"init": "random",
                                                                                              "init_text": None})})
    model = get_peft_model(model, peft_config(plain, model))
    from finetune.model import install_variants

    install_variants(model, recipe)  # IEC's scalars, AdaMix's experts: trainable parameters too
    for name, p in model.named_parameters():
        if ".ranknum." in name:  # AdaLoRA's rank count is a frozen parameter (created trainable on the meta device)
            p.requires_grad_(False)
    return model, stored



def dora_magnitudes(model, recipe: Recipe) -> list:
    """DoRA's trainable magnitude vectors (meta tensors): one value per output feature of each adapted layer."""
    import torch
    from peft.tuners.lora import LoraLayer

    if not recipe.lora.use_dora:
        return []
    return [torch.empty(m.out_features, device="meta") for m in model.modules() if isinstance(m, LoraLayer)]



def weight_bytes(model, width: int) -> tuple[int, int]:
    """(bytes of 4-bit layers with their quantization constants (GGUF layers: their blocks), bytes of every other
    base weight)."""
    import bitsandbytes as bnb

    from finetune.quant import QuantLinear

    quantized, kept, seen = 0, 0, set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            quantized += module.packed_bytes()
        elif isinstance(module, bnb.nn.Linear4bit):
            quantized += nf4_bytes(module.in_features * module.out_features, module.weight.compress_statistics)
            seen.add(id(module.weight))
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) not in seen and not p.requires_grad:
            kept += p.numel() * width
    return quantized, kept



def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight of n values (blocksize 64)."""
    blocks = math.ceil(n / BLOCK)
    codes = math.ceil(n / 2) + 16 * 4  # two codes a byte, and the NF4 table
    if not double_quant:
        return codes + 4 * blocks
    # uint8 absmax, a float32 scale per 256 of them, their offset and code table
    return codes + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 256 * 4



def optimizer_bytes(params, optimizer: str) -> int:
    total = 0
    for p in params:
        n = p.numel()
        if optimizer == "paged_adamw_8bit" and n >= MIN_8BIT_SIZE:
            total += 2 * (n + 4 * math.ceil(n / 256))  # two uint8 moments, a float32 scale per block each
        else:
            total += 8 * n + (4 if optimizer == "adamw_torch" else 0)  # two float32 moments (+ torch's step tensor)
    if optimizer == "paged_adamw_8bit" and any(p.numel() >= MIN_8BIT_SIZE for p in params):
        total += 2 * 256 * 4  # the shared 8-bit code tables
    return total



def activation_bytes(model, recipe: Recipe, batch: int, seq: int, width: int, checkpointing: bool,
                     stream: int | None = None, device: str = "cpu") -> int:
    """Bytes saved for backward by the decoder stack for one micro batch (Llama-style decoder).
    Layers differ when lora.layers or the rank pattern make them: each is counted with its own adapters.
    LoRA dropout on CPU (finetune.model.dropout.CpuDropout): one dropped input per input tensor, shared by the
    adapters reading it, and its dropped positions (8 bytes each, p of the values; a byte mask above p = 1/8); on
    GPU torch's fused dropout: one boolean mask (a byte a value) per adapter. `stream`: bytes per value of the
    residual stream and what the layer computes from it (norms, rotated q/k, the MLP's intermediates; float32 on
    GPU QLoRA), `width` those of the adapters' inputs."""
    stream = stream or width
    c = model.config.get_text_config()
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    tokens = batch * seq
    adapted = _adapted_by_layer(model)
    moe = moe_token_bytes(c, stream)  # a mixture of experts' block instead of the dense MLP (plan/moe.py)
    expert_weights, expert_tokens = expert_lora_bytes(model, width)
    per_layer = [per_token_layer_bytes(adapted.get(i, []), recipe, h, 0 if moe else inter, heads, kv, head_dim, width,
                                       stream, shared_masks=device == "cpu")
                 + (heads + 2) * 4 + (moe or 0) + expert_tokens * width for i in range(layers)]
    if device == "cpu" and width == 2 and (recipe.data.packing or recipe.training.padding_free):
        # short bf16 examples of a packed / padding-free row attend by matrix products, keeping each example's
        # [heads, n, n] probabilities for backward: heads x n values per token (finetune/model/attention.py)
        from finetune.model import MATH_MAX_TOKENS

        per_layer = [b + heads * min(seq, MATH_MAX_TOKENS) * width for b in per_layer]
    rotary = 2 * seq * head_dim * width  # cos and sin, shared by the layers
    final = tokens * (h * stream + 4)  # the final norm's input and statistics
    prefix = recipe.prefix_tuning.num_virtual_tokens if recipe.adapter.method == "prefix_tuning" else 0
    if prefix:  # each layer's keys and values with the prefix before them, and one float mask over them
        per_layer = [b + 2 * (seq + prefix) * kv * head_dim * stream // seq for b in per_layer]
        final += batch * seq * (seq + prefix) * 4
    if checkpointing:
        return tokens * layers * h * stream + tokens * max(per_layer) + rotary + final + expert_weights
    return tokens * sum(per_layer) + rotary + final + layers * expert_weights



def per_token_layer_bytes(adapted: list[tuple[str, int, int, int]], recipe: Recipe, h: int, inter: int,
                          heads: int, kv: int, head_dim: int, width: int, stream: int, shared_masks: bool = True) -> int:
    """Bytes saved per token by one decoder layer (excluding the float32 statistics), given its adapters
    (short name, in_features, out_features, rank): the layer's own values of `stream` bytes, the adapters'
    of `width`, dropout masks (with `shared_masks`, CPU's: one per input tensor, as its dropped positions).
    DoRA keeps, per adapter, the base output and the scaled adapter output (its magnitude's gradient needs
    both): 2 x out_features more."""
    from finetune.model import POSITIONS_MAX_P  # lazily: finetune.model's modules import torch

    attention_out = heads * head_dim
    base = 2 * h + (heads + 2 * kv) * head_dim + attention_out + 3 * inter  # residuals, q k v, output, MLP
    dropout, dora = adapter_dropout(recipe), recipe.lora.use_dora
    # adapter inputs: which tensor each projection reads, its size, and whether the base already saves it
    inputs = {"q_proj": ("x", h, False), "k_proj": ("x", h, False), "v_proj": ("x", h, False),
              "o_proj": ("attn", attention_out, True),
              "gate_proj": ("xm", h, False), "up_proj": ("xm", h, False), "down_proj": ("act", inter, False)}
    extra, masks, counted = 0, 0, set()
    for name, d_in, d_out, r in adapted:
        if r < 0:  # IA3: l * (W x) keeps W x for l's gradient; a feed-forward layer's matmul keeps its scaled input
            extra += d_out if r == -1 else d_in
            continue
        group, size, saved = inputs.get(name, (name, d_in, False))
        extra += r + (2 * d_out if dora else 0)
        if dropout > 0 and not (shared_masks and group in counted):
            extra += size  # the dropped input: one per adapter, or one per input tensor with shared masks
            masks += size * (8 * dropout if shared_masks and dropout <= POSITIONS_MAX_P else 1)  # and its mask
            counted.add(group)
        elif dropout == 0 and not saved and group not in counted:
            extra += size  # the shared input, once
            counted.add(group)
    return base * stream + extra * width + math.ceil(masks)



def _adapted_by_layer(model) -> dict[int, list[tuple[str, int, int, int]]]:
    """Decoder layer index -> (short name, in_features, out_features, rank) of its LoRA-wrapped (AdaLoRA: init_r)
    linear layers; IA3 layers with rank -1 (scaled output) or -2 (scaled feed-forward input)."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    from peft.tuners.lora.layer import ParamWrapper

    found: dict[int, list] = {}
    for name, module in model.named_modules():
        m = re.search(r"\.layers\.(\d+)\.", name + ".")
        if isinstance(module, ParamWrapper):  # LoRA inside a MoE's expert weights: plan/moe.py
            continue
        if m and isinstance(module, LoraLayer):
            found.setdefault(int(m.group(1)), []).append(
                (name.rsplit(".", 1)[-1], module.in_features, module.out_features, next(iter(module.r.values()))))
        elif m and isinstance(module, IA3Layer):
            found.setdefault(int(m.group(1)), []).append(
                (name.rsplit(".", 1)[-1], module.in_features, module.out_features, -2 if module.is_feedforward else -1))
    return found


def adapter_dropout(recipe: Recipe) -> float:
    """The dropout on the adapters' inputs: LoRA's or AdaLoRA's (the other methods have none)."""
    return {"lora": recipe.lora.dropout, "adamix": recipe.lora.dropout,
            "adalora": recipe.adalora.dropout}.get(recipe.adapter.method, 0.0)


def virtual_tokens(recipe: Recipe) -> int:
    """Positions prompt and P-tuning prepend to every sequence (prefix tuning's sit in the keys/values only)."""
    method = recipe.adapter.method
    return getattr(recipe, method).num_virtual_tokens if method in ("prompt_tuning", "p_tuning") else 0



def working_bytes(model, tokens: int, width: int, dora: bool = False) -> int:
    """One dequantized weight and one layer's widest activation gradient; DoRA also forms W + s B A in float32
    for its weight norm (and B A for it) while a layer runs."""
    import bitsandbytes as bnb

    from finetune.quant import QuantLinear

    c = model.config.get_text_config()
    largest = max((m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, (bnb.nn.Linear4bit, QuantLinear))), default=0)
    return largest * width + 2 * tokens * max(c.hidden_size, c.intermediate_size) * width + dora * 2 * largest * 4



def runtime_rss() -> int:
    """Resident memory of this process after importing what training imports: the runtime every run pays."""
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    try:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



def checkpoint_bytes(recipe: Recipe) -> int:
    path = Path(recipe.model.name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stat().st_size
    if not path.is_dir():
        return 0  # a hub id: its files are in the cache; not counted
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
