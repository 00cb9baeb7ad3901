"""The decode step as plain tensors: a Llama-family causal LM (llama, mistral, qwen2) read out of its transformers
(and PEFT) modules once (`build_lean`), then run by one function per forward pass over a static KV cache (step.py).

What the model's own forward costs per token beyond the matrix products (module calls, hooks, mask building, PEFT's
per-adapter dispatch, bitsandbytes dequantizing every 4-bit weight again) is gone (the weights: weights.py):
- a 4-bit base is dequantized once, to the compute dtype, with the op bitsandbytes' own CPU matmul uses, so its
  products are the same numbers (kept per weight while the model lives, when memory allows: `dense_weight`);
- a float32 weight is kept in oneDNN's pre-packed layout (`pack`: what inductor's freezing gives CPU linears): the
  same products, blocked for the matrix kernel once instead of at every call; on a 2-core AVX2 CPU 1.5x faster at
  one row and 1.8-2.3x at 4 to 16 rows than `F.linear` on the plain weight (docs/performance.md). A bf16 weight is
  packed too where oneDNN packs bf16 (AVX512_BF16 / AMX CPUs: 1.5-1.9x there), plain on an AVX2 CPU;
  where the plain weight's product is faster at one or two rows (`plain_rows`: measured; an Ice Lake Xeon), the plain
  weight is kept beside the packed one and runs those;
- with FINETUNE_DECODE_WEIGHTS=int8 (opt-in: not the model's numbers), an int8 copy of every weight runs the products
  of up to `int8_rows` rows (decoding a few sequences: half the time per token at one row on an Ice Lake Xeon), the
  exact weights the products of more rows (most prefills, large batches); on a 4-bit base in bf16, a stacked group
  whose NF4 codes bitsandbytes' CPU kernel reads faster than its int8 copy (gate/up on an AMX Xeon) runs its one-row
  products from those codes instead, the adapter beside them (nf4.py);
- q/k/v and gate/up (each group reads one input) are one packed weight per group, stacked by rows: one product
  where there were three and two, each projection's columns the same numbers (`_stacked`; `weights.fused_packed`);
- one adapter decoded alone is folded into the weights (W + s B A, as PEFT merges) in float32 compute; in bf16 it
  stays beside them, computed as PEFT computes it under training's autocast (finetune.model.compute_like_training:
  the float32 A and B meet the bf16 activations as bf16, (B(A x)) s in bf16), since folding would round the sum;
  under FINETUNE_DECODE_WEIGHTS=int8 it is folded into the int8 copies (`build_lean`'s `fold_int8`);
- several adapters are one batched op per layer (punica's idea, without its kernel): every adapter's A stacked into
  one matrix, one product for all rows, each row's columns kept by a [rows, columns] 0/1 mask, one product with the
  stacked B, then each row scaled by its adapter's scaling (after B, as PEFT scales). A batch whose rows share one
  adapter takes that adapter's own A and B.

Anything this step does not model (another architecture, a LoRA variant such as DoRA, other PEFT methods, trained
copies of whole modules, sliding-window attention) is named by `why_not_lean`; callers then use the model's forward.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from finetune.generate import nf4
from finetune.generate.weights import (
    FOLD_WIN, WIN, base_model, compute_dtype, dense_bytes, dense_weight, fits_in_memory, fused_int8, fused_packed,
    int8_available, int8_bytes, int8_product, int8_ratios, int8_requested, int8_rows, int8_weight, layer_int8, pack,
    pack_bytes, packable, packed_product, packed_weight, plain_bytes, plain_rows)

log = logging.getLogger("finetune.generate")

FAMILIES = ("llama", "mistral", "qwen2")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections that read the same input


@dataclass
class Lora:
    """One projection's adapters: their A stacked ([R, in], R = sum of ranks) and B side by side ([out, R]), which
    adapter owns each column, with its scaling; and each adapter's own (A, B, scaling) for uniform batches."""

    a: torch.Tensor
    b: torch.Tensor
    owner: torch.Tensor  # [R] long: index into LeanModel.adapters
    scale: torch.Tensor  # [len(LeanModel.adapters) + 1] float32: each adapter's scaling, 0 last (the base's, -1)
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]]
    layout: tuple  # equal for projections with the same adapters and ranks: their masks are shared in a step
    rounds: torch.dtype | None = None  # bf16 adapters: A and B held as float32 copies, each product rounded to bf16


@dataclass
class Linear:
    weight: torch.Tensor | None  # None when `packed` holds it
    bias: torch.Tensor | None = None
    lora: Lora | None = None
    quantized: torch.nn.Module | None = None  # a 4-bit layer dequantized at every use (memory did not allow more)
    packed: torch.Tensor | None = None  # the weight in oneDNN's layout (`pack`)
    plain_rows: int = 0  # inputs of up to this many rows take `weight` (kept beside `packed`: `plain_rows`)
    int8: tuple[torch.Tensor, torch.Tensor] | None = None  # the weight as int8 and its row scales (`int8_weight`)
    int8_rows: int = 0  # inputs of up to this many rows take `int8`
    int8_folds: bool = False  # `int8` holds the adapter (W + s B A): products on it skip `lora`
    widths: list[int] | None = None  # several projections' weights stacked (`_stacked`): each one's output columns
    nf4: nf4.Nf4 | None = None  # the base's 4-bit weights for one-row products (nf4.py), with the int8 copy's adapter

    def takes_int8(self, x: torch.Tensor) -> bool:  # x.shape[0], not len(x): Tensor.__len__ is Python, ~2 us a call
        return self.int8 is not None and x.shape[0] <= self.int8_rows

    def holds_adapter(self, x: torch.Tensor) -> bool:
        """Whether x's product includes the adapter (folded into the int8 copy, or beside the NF4 codes): then `lora`
        is not added again."""
        if self.nf4 is not None and nf4.takes(x):
            return self.nf4.a is not None
        return self.int8_folds and self.takes_int8(x)

    def row(self, dtype: torch.dtype) -> tuple:
        """(x -> this product for one contiguous row of `dtype`, whether that includes the adapter): the branch
        `__call__` and `holds_adapter` take for such an x, chosen once for the step's one-row pass (step.py), which
        makes ~120 products a token where each call's Python counts."""
        if self.nf4 is not None and dtype == torch.bfloat16:
            return self.nf4, self.nf4.a is not None
        eight = self.int8 is not None and self.int8_rows >= 1
        if eight and dtype == torch.bfloat16 and self.bias is None:
            q, scale = self.int8
            return (lambda x: torch._weight_int8pack_mm(x, q, scale)), self.int8_folds  # (int8_product's bf16 case)
        return self, self.int8_folds and eight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b for 2-D x."""
        if self.nf4 is not None and nf4.takes(x):
            return self.nf4(x)
        if self.takes_int8(x):
            out = int8_product(x, *self.int8)
            return out if self.bias is None else out + self.bias
        if self.packed is not None and (self.weight is None or x.shape[0] > self.plain_rows):
            return packed_product(x, self.packed, self.bias)
        weight = self.weight if self.quantized is None else dense_weight(self.quantized, keep=False)
        return F.linear(x, weight, self.bias)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    proj: dict[str, Linear]  # each projection's adapters, and its weights unless `fused` holds them
    fused: dict[tuple[str, ...], Linear] = field(default_factory=dict)  # SHARED's weights stacked (`_stacked`)


@dataclass
class LeanModel:
    layers: list[Layer]
    embed: torch.Tensor
    norm: torch.Tensor
    head: Linear
    rotary: torch.nn.Module  # the model's own rotary embedding (every rope type it supports)
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    dtype: torch.dtype
    adapters: list[str] = field(default_factory=list)  # adapters with LoRA columns; index = Lora.owner
    folded: str | None = None  # the adapter folded into the weights
    int8_folded: str | None = None  # the adapter folded into the int8 copies only (bf16: `build_lean`)
    cast_before_add: bool = False  # bitsandbytes' LoRA layers cast the LoRA output to the result dtype, then add
    rows: dict = field(default_factory=dict, repr=False)  # adapter index -> the one-row pass's plan (step.py)

    def index(self, adapter: str | None) -> int:
        """The adapter's index, -1 for the base (or the folded adapter: it is in the weights)."""
        return -1 if adapter is None or adapter == self.folded or adapter not in self.adapters else \
            self.adapters.index(adapter)


# ----------------------------------------------------------------------------------------------- reading a model


def why_not_lean(model, adapters: list[str] | None = None) -> str | None:
    """Why this step cannot decode `model` with `adapters` (None: every adapter it holds) active; None: it can."""
    base = base_model(model)
    config = getattr(base, "config", None)
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        if adapters is not None and name not in adapters:
            continue
        method = str(getattr(cfg.peft_type, "value", cfg.peft_type))
        if method != "LORA":
            return f"a {method} adapter"
        if getattr(cfg, "use_dora", False) or getattr(cfg, "lora_bias", False) or cfg.bias != "none":
            return f"adapter {name}: a LoRA variant (DoRA or LoRA biases)"
        if getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
            return f"adapter {name}: trained copies of whole modules"
        for module in base.modules():
            if name in getattr(module, "lora_variant", {}) or name in getattr(module, "lora_embedding_A", {}):
                return f"adapter {name}: a LoRA variant or an embedding adapter"
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} (the decode step knows {', '.join(FAMILIES)})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if not hasattr(getattr(base, "model", None), "layers") or not hasattr(base.model, "rotary_emb"):
        return "an unfamiliar module layout"
    if adapters is None and getattr(model, "peft_config", None) and len(model.active_adapters) > 1:
        return "several adapters active at once"
    return None


def build_lean(model, adapters: list[str] = (), fold: str | None = None,
               fold_int8: str | None = None) -> LeanModel:
    """The step's view of `model` (checked by `why_not_lean` first): `adapters` get stacked LoRA columns; `fold` (one
    adapter) is folded into the weights instead. `fold_int8` (the one adapter of `adapters`, every row decoding with
    it) is folded into the int8 copies where int8 decode weights are used, and stays beside the exact weights (bf16,
    where folding would round the exact sum): int8 products already differ from the exact ones, and the adapter's
    two small products per projection beside them cost a 2-core CPU more than the int8 product itself saves."""
    base = base_model(model)
    config, inner = base.config, base.model
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    adapters = [a for a in adapters if a != fold]
    dtype = compute_dtype(model)
    dense, copies = dense_bytes(model), pack_bytes(model)
    keep = fits_in_memory(dense)
    packs = keep and packable(dtype) and fits_in_memory(copies)
    # a plain copy beside each packed one, counted with what packing takes (all of it is allocated below)
    both = packs and fits_in_memory(dense + copies + plain_bytes(model))
    plain = plain_rows(dtype) if both else 0
    eight = _int8_rows(dtype, (dense if keep else 0) + (copies if packs else 0) + int8_bytes(model),
                       fold_int8 is not None and fold_int8 in adapters) if int8_requested() else 0
    plain = 0 if eight else plain  # (the int8 copy runs the few-row products)
    # the dtype the model's forward autocasts to (finetune.model.compute_like_training): float32 adapter weights
    # meet the activations in it, so they are kept in it here (None: no autocast, as they are)
    autocast = base.__dict__.get("_finetune_autocast")
    layers = []
    for layer in inner.layers:
        # each group's weights stacked where they are packed copies anyway (no plain copy runs a few rows)
        fused = {names: _stacked([_projection(layer, p) for p in names], fold, keep, eight, fold_int8)
                 for names in (SHARED if packs and not plain else ())}
        fused = {names: lin for names, lin in fused.items() if lin is not None}
        stacked = {p for names in fused for p in names}
        layers.append(Layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                            {p: Linear(None, lora=_lora(_projection(layer, p), adapters, autocast)) if p in stacked
                                else _linear(_projection(layer, p), adapters, fold, keep, autocast, packs, plain,
                                             eight, fold_int8) for p in PROJECTIONS}, fused))
    if eight and dtype == torch.bfloat16 and nf4.available():
        _use_nf4(inner.layers, layers, fold_int8 if fold_int8 in adapters else None)
    any_4bit = any(type(getattr(getattr(m, "base_layer", m), "weight", None)).__name__ == "Params4bit"
                   for m in base.modules())
    return LeanModel(layers, inner.embed_tokens.weight.detach(), inner.norm.weight.detach(),
                     _linear(base.lm_head, (), None, keep, packs=packs, plain=plain, int8=eight), inner.rotary_emb,
                     text.num_attention_heads, text.num_key_value_heads, head_dim, text.rms_norm_eps, dtype,
                     list(adapters), fold, fold_int8 if eight and fold_int8 in adapters else None,
                     cast_before_add=any_4bit)


def _int8_rows(dtype: torch.dtype, total: int, folds: bool) -> int:
    """`int8_rows` where int8 decode weights are asked for and `total` bytes (with their copy) fit; else 0; said
    once either way. Where an adapter `folds` into the int8 copy, int8 may be up to 1.25x slower (`FOLD_WIN`)."""
    rows = int8_rows(dtype, FOLD_WIN if folds else WIN) if int8_available() else 0
    if not int8_available():
        why = "this torch has no weight-only int8 product"
    elif not fits_in_memory(total):
        why = f"the int8 copy does not fit in memory beside the rest ({total / 2**30:.1f} GiB)"
    elif not rows:
        ratio = int8_ratios(dtype).get(1, float("nan"))
        why = (f"the int8 product is too slow on this CPU, even at one row (it took {ratio:.2f}x the exact "
               "product's time)")
    else:
        _note(f"decoding with int8 weights (FINETUNE_DECODE_WEIGHTS=int8) for products of up to {rows} "
              f"row{'s' if rows > 1 else ''}, the exact weights above")
        return rows
    _note(f"decoding with the exact weights, not int8 (FINETUNE_DECODE_WEIGHTS=int8): {why}")
    return 0


_NF4_CHOSEN: dict[tuple, bool] = {}  # per process: (group, its int8 shape, layers, adapter?) -> NF4 measured faster


def _use_nf4(modules: list, layers: list[Layer], adapter: str | None) -> None:
    """Each stacked group whose NF4 copy (nf4.py: the base's own 4-bit weights, `adapter` beside them) runs its
    one-row products faster than its int8 copy over every layer takes them; measured once per process and group
    (GRPO rebuilds the lean model at every rollout), said once."""
    for names in SHARED:
        groups = [layer.fused.get(names) for layer in layers]
        if any(g is None or g.int8 is None or g.bias is not None for g in groups):
            continue
        key = (names, tuple(groups[0].int8[0].shape), len(groups), adapter is not None)
        if _NF4_CHOSEN.get(key) is False or not fits_in_memory(
                sum(_projection(m, p).in_features * _projection(m, p).out_features // 2 for m in modules for p in names)):
            continue
        copies = [nf4.group_nf4([_projection(m, p) for p in names], adapter) for m in modules]
        if any(c is None for c in copies):
            continue
        if key not in _NF4_CHOSEN:
            x = torch.randn(1, copies[0].in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
            _NF4_CHOSEN[key] = nf4.faster([functools.partial(int8_product, q=g.int8[0], scale=g.int8[1])
                                           for g in groups], copies, x)
        if _NF4_CHOSEN[key]:
            for group, codes in zip(groups, copies):
                group.nf4 = codes
            _note(f"decoding {'/'.join(names)} at one row from the base's NF4 weights (faster than their int8 copy)")
        else:  # the codes' copies are not kept
            for m in modules:
                first = _projection(m, names[0])
                weight = getattr(first, "base_layer", first).weight
                if hasattr(weight, nf4.FORMAT):
                    delattr(weight, nf4.FORMAT)


@functools.cache
def _note(message: str) -> None:
    log.warning(message)


def _projection(layer, name: str):
    return getattr(layer.self_attn if name in PROJECTIONS[:4] else layer.mlp, name)


def _linear(module, adapters: list[str], fold: str | None, keep: bool, autocast: torch.dtype | None = None,
            packs: bool = False, plain: int = 0, int8: int = 0, fold_int8: str | None = None) -> Linear:
    """A projection as the step runs it; a 4-bit one that is not kept dequantized is dequantized at every use; its
    adapters' A and B in `autocast` (their own dtype where None: `_lora`); its weight packed for oneDNN where `packs`,
    the plain one kept beside it for inputs of up to `plain` rows, an int8 copy for inputs of up to `int8` rows (with
    adapter `fold_int8` folded into it)."""
    base = getattr(module, "base_layer", module)
    bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
    weight = packed = eight = None
    folds_int8 = bool(int8) and _holds(module, fold_int8)
    if _holds(module, fold):
        weight = dense_weight(base, keep=keep and not packs)
        weight = _folded(module, fold, weight).to(weight.dtype)
        eight = int8_weight(weight) if int8 else None
        packed = pack(weight) if packs else None
    else:
        if folds_int8:  # (before packing, which drops a 4-bit weight's dense copy)
            eight = int8_weight(_folded(module, fold_int8, dense_weight(base, keep=keep)))
        elif int8:
            eight = layer_int8(base, keep)
        if packs:
            packed = packed_weight(base, keep_plain=plain > 0)
    if packed is not None and not plain:
        weight = None
    elif weight is None and keep:
        weight = dense_weight(base)
    quantized = base if weight is None and packed is None else None
    return Linear(weight, bias, _lora(module, adapters, autocast), quantized=quantized, packed=packed,
                  plain_rows=plain, int8=eight, int8_rows=int8 if eight is not None else 0, int8_folds=folds_int8)


def _holds(module, adapter: str | None) -> bool:
    return adapter is not None and adapter in getattr(module, "lora_A", {})


def _lora(module, adapters: list[str], autocast: torch.dtype | None) -> Lora | None:
    """The projection's `adapters` (those it holds; None: none): their A and B in `autocast` (their own dtype where
    None), float32 copies of bf16 ones (`_product`), stacked for batches of mixed adapters."""
    found = [(i, name) for i, name in enumerate(adapters) if _holds(module, name)]
    if not found:
        return None
    parts = {i: (_as(module.lora_A[n].weight, autocast), _as(module.lora_B[n].weight, autocast),
                 float(module.scaling[n])) for i, n in found}
    rounds = parts[found[0][0]][0].dtype
    rounds = rounds if rounds in (torch.bfloat16, torch.float16) else None
    if rounds is not None:  # (see `_product`)
        parts = {i: (a.float(), b.float(), s) for i, (a, b, s) in parts.items()}
    owner = torch.cat([torch.full((parts[i][0].shape[0],), i) for i, _ in found])
    scale = torch.tensor([parts[i][2] if i in parts else 0.0 for i in range(len(adapters))] + [0.0])
    layout = tuple((i, parts[i][0].shape[0], parts[i][2]) for i, _ in found)
    return Lora(torch.cat([parts[i][0] for i, _ in found]), torch.cat([parts[i][1] for i, _ in found], dim=1),
                owner, scale, parts, layout, rounds)


def _stacked(modules: list, fold: str | None, keep: bool, int8: int, fold_int8: str | None) -> Linear | None:
    """The weights of `modules` (projections reading one input) stacked by rows, packed, as `_linear` builds one
    projection's (`packs`, no plain copy; with `fold` folded in, or an int8 copy for up to `int8` rows holding
    `fold_int8`): one product for all of them, each one's columns the same numbers as its own product
    (`weights.fused_packed`), split by `Linear.widths`. Their adapters stay each projection's own (`_linear`).
    None where their biases differ in kind, or oneDNN does not pack them."""
    bases = [getattr(m, "base_layer", m) for m in modules]
    biases = [getattr(b, "bias", None) for b in bases]
    if len({b is None for b in biases}) > 1 or not keep:
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    into8 = bool(int8) and any(_holds(m, fold_int8) for m in modules)
    eight = None
    if any(_holds(m, fold) for m in modules):
        dense = [dense_weight(b, keep=False) for b in bases]
        weight = torch.cat([_folded(m, fold, d).to(d.dtype) if _holds(m, fold) else d for m, d in zip(modules, dense)])
        eight, packed = int8_weight(weight) if int8 else None, pack(weight)
    else:
        if into8:  # (before packing, which drops a 4-bit weight's dense copy)
            eight = int8_weight(torch.cat([_folded(m, fold_int8, d) if _holds(m, fold_int8) else d.float()
                                           for m, d in zip(modules, (dense_weight(b, keep=keep) for b in bases))]))
        elif int8:
            eight = fused_int8(bases, keep)
        packed = fused_packed(bases)
    if packed is None:
        return None
    return Linear(None, bias, packed=packed, int8=eight, int8_rows=int8 if eight is not None else 0,
                  int8_folds=into8, widths=[_out_features(b) for b in bases])


def _out_features(layer) -> int:
    weight = layer.weight
    return weight.quant_state.shape[0] if type(weight).__name__ == "Params4bit" else weight.shape[0]


def _folded(module, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """W + s B A in float32, as PEFT merges an adapter."""
    a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()
    return weight.float() + (b.float() @ a.float()) * module.scaling[adapter]


def _as(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return weight.detach() if dtype is None else weight.detach().to(dtype)
