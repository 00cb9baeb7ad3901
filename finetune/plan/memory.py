"""`finetune plan`: predicted peak training memory of a recipe, without loading any weights.

The model is built on the meta device (shapes only), converted to 4-bit the way
transformers does it and wrapped with the recipe's LoRA config by peft itself, so
which layers are quantized and which get adapters is exactly what training will
do. The terms:

- 4-bit base weights: per quantized layer of n weights, n/2 bytes of NF4 codes, one
  absmax per 64-weight block (one byte each with double quantization, plus a float32
  per 256 of those, an offset and its 256-entry code table; four bytes without), and
  the 16-entry NF4 table.
- weights kept in the compute dtype: embeddings, norms, an untied LM head, biases; a mixture of experts' fused
  expert tensors and routers (not nn.Linear, so not quantized; plan/moe.py).
- LoRA parameters and their gradients: float32 (peft upcasts adapters); DoRA adds a
  magnitude per output feature of every adapted layer.
- optimizer states: AdamW keeps two float32 moments per parameter; the 8-bit
  bitsandbytes variant keeps two bytes per parameter plus a float32 scale per
  256-value block for tensors of at least 4096 values (smaller ones stay 32-bit).
- activations saved for backward, per token and layer, counted tensor by tensor
  for a Llama-style decoder (a mixture of experts' block and expert LoRA: plan/moe.py) (residual stream, RMSNorm statistics, rotated q/k, v,
  attention output and log-sum-exp, the gated MLP's three intermediates, and for
  every adapter its input after dropout, the dropout mask (booleans) and its rank-r output, and
  for DoRA its base and adapter outputs; each layer with its own adapters and ranks; on a CPU in bf16
  with packed or padding-free rows, the attention probabilities of examples short enough to attend by
  matrix products, finetune/model/attention.py);
  with gradient checkpointing only each layer's input is kept, plus one layer's
  full set while it is recomputed. Counted for micro_batch_size x sequence length,
  where the sequence length is the longest example of the recipe's data when the
  data can be read (batches are padded to their longest example), else max_length;
  with `training.padding_free`, the micro batch's longest examples end to end.
- loss: finetune computes the LM head only at labelled positions, in chunks of at
  most 64 MiB of float32 logits (finetune/objectives/loss.py); a reward model's
  score head gives one float32 number per position instead.
- what each objective holds: a pair objective (dpo, orpo, simpo, reward) forwards both
  answers of micro_batch_size pairs, GRPO G answers per prompt; the reference forwards of
  DPO, KTO and GRPO run without gradients (adapter off: no second model), so they hold
  nothing for backward and only add a forward's transient buffers.
- working buffers: one dequantized weight matrix and the gradient of one layer's
  widest activation, alive during backward.

On CPU the peak resident memory also holds the Python/torch runtime (measured in
this process after importing the training stack) and the memory-mapped checkpoint:
weights that stay in their stored dtype are used in place from the file, so its
pages stay resident. And the allocator's slack: glibc keeps freed blocks for reuse
instead of returning them, about as much as the activations *without* checkpointing
(measured 0.9 to 1.1 times, with checkpointing too: recomputation frees and reallocates
every layer's full set); tcmalloc, which `finetune train` preloads where it is
installed (finetune/model/allocator.py), keeps none measurable (docs/performance.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from finetune.errors import FinetuneError, RecipeError, first_line
from finetune.plan.moe import moe_shape
from finetune.plan.terms import (
    activation_bytes, checkpoint_bytes, dora_magnitudes, meta_model, optimizer_bytes, runtime_rss, virtual_tokens,
    weight_bytes,
    working_bytes,
)
from finetune.recipe import PAIR_OBJECTIVES, Recipe

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class Term:
    name: str
    bytes: int
    note: str = ""
    counted: bool = True  # part of the predicted peak (alternatives are shown, not added)


@dataclass
class MemoryPlan:
    recipe: str
    device: str
    seq_length: int
    seq_note: str
    terms: list[Term] = field(default_factory=list)
    trainable_parameters: int = 0  # of the adapter (whichever method), as PEFT counts them
    available: int | None = None
    available_note: str = ""

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms if t.counted)

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    @property
    def verdict(self) -> str:
        if self.available is None:
            return "no memory limit known: pass --device-memory, e.g. 24GiB"
        if self.total <= 0.9 * self.available:
            return f"fits: {self.total / self.available:.0%} of {gib(self.available)}"
        if self.total <= self.available:
            return f"tight: {self.total / self.available:.0%} of {gib(self.available)}; allocator overhead may not fit"
        return f"does not fit: needs {gib(self.total)}, {gib(self.available)} available"


def parse_size(text: str) -> int:
    """'24GiB', '24 GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise RecipeError(f"--device-memory '{text}' is not a size; write e.g. 24GiB, 80GB or 512MiB.")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    if not 0 < value < 2**63:  # 1e400GiB is inf; a size the machine cannot have is a typo
        raise RecipeError(f"--device-memory '{text[:40]}' is not a size a device has; write e.g. 24GiB or 80GB.")
    return int(value)


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------- the plan


def plan(recipe: Recipe, device_memory: int | None = None, device: str | None = None,
         seq_length: int | None = None) -> MemoryPlan:
    """Predicted peak memory of training `recipe` on `device` (default: cuda if available, else cpu)."""
    import dataclasses

    import torch
    from finetune.model import DeviceFacts, auto_compute_dtype, resolve

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    placement = resolve(recipe.quantization)  # once, as training resolves it
    if device == "cpu" and recipe.quantization.compute_dtype == "auto":  # (planned from a GPU machine too)
        cpu = dataclasses.replace(DeviceFacts.probe(), cuda=False)
        placement = dataclasses.replace(placement, compute_dtype=auto_compute_dtype(cpu))
    dtype = placement.compute_dtype
    width = torch.empty((), dtype=dtype).element_size()
    # On GPU, prepare_model_for_kbit_training keeps embeddings, norms and head in float32, so the residual
    # stream runs in float32 too (4-bit layers cast their output back to their input's dtype); on CPU they are
    # cast back to the compute dtype (finetune.model.load._frozen_floats_in_compute_dtype); sharded runs skip it.
    gguf = recipe.quantization.packed  # the file's own blocks (or ICQ-NF4's): QuantLinear layers
    stream = 4 if recipe.quantization.load_in_4bit and not gguf and device != "cpu" and \
        not placement.shards_parameters else width
    model, stored_dtype = meta_model(recipe, placement)
    t, method = recipe.training, recipe.adapter.method
    if seq_length is None:
        seq_length, seq_note = _sequence_length(recipe)
        if t.objective == "grpo":  # GRPO trains on prompt + sampled answer (an upper bound: the prompt + its reference)
            seq_length += recipe.grpo.max_new_tokens
            seq_note += f", + grpo.max_new_tokens {recipe.grpo.max_new_tokens}"
    else:
        seq_note = "given"
    if n_virtual := virtual_tokens(recipe):  # the soft prompt runs through every layer like any other position
        seq_length, seq_note = seq_length + n_virtual, seq_note + f", + {n_virtual} virtual tokens"
    batch = t.micro_batch_size * _sequences_per_item(recipe)
    tokens = batch * seq_length

    quantized, kept = weight_bytes(model, stream)
    trainable = [p for p in model.parameters() if p.requires_grad] + dora_magnitudes(model, recipe)
    n_trainable = sum(p.numel() for p in trainable)
    ckpt = t.gradient_checkpointing
    forwards = _forwards(recipe)
    used, other = (forwards * activation_bytes(model, recipe, batch, seq_length, width, checkpointing=c,
                                               stream=stream, device=device) for c in (ckpt, not ckpt))
    config = model.config.get_text_config()
    loss, loss_note = _loss_bytes(recipe, tokens * forwards, config.vocab_size, config.hidden_size, width)
    mapped = checkpoint_bytes(recipe) if device == "cpu" and not gguf else 0  # gguf: copied out of the map
    in_place = bool(mapped) and stored_dtype == dtype  # CPU uses such weights in place from the mapped file

    terms = [
        Term("4-bit base weights", quantized, _weights_note(quantized, recipe.quantization.quant_type if gguf else "")),
        Term("weights in compute dtype", kept, _kept_note(config, dtype, in_place), counted=not in_place),
        Term(f"{'LoRA' if method == 'lora' else method} parameters", 4 * n_trainable, f"{n_trainable:,} trainable"),
        Term("gradients", 4 * n_trainable, "float32, one per trainable parameter"),
        Term("optimizer states", optimizer_bytes(trainable, t.optimizer), t.optimizer),
        Term("activations", used,
             f"{batch} x {seq_length} tokens, {'with' if ckpt else 'without'} gradient checkpointing"
             + (", two forwards (AdaMix consistency)" if forwards == 2 else "")),
        Term(f"activations {'without' if ckpt else 'with'} checkpointing", other, "the alternative, not added",
             counted=False),
        Term("loss (labelled positions, chunked)", loss, loss_note),
        Term("working buffers", working_bytes(model, tokens, width, recipe.lora.use_dora),
             "a dequantized weight, one layer's gradients" + (", DoRA's W + s B A" if recipe.lora.use_dora else "")),
    ]
    if device == "cpu":
        from finetune.model import for_training

        malloc = for_training()
        full = other if ckpt else used  # the activations without checkpointing
        slack, note = (0, f"{malloc}: returns what it does not reuse (measured within 10%)") if malloc != "glibc" \
            else (full, "freed blocks glibc keeps: ~1x the activations without checkpointing, also with it "
                  "(measured 0.9-1.1x); tcmalloc keeps none (finetune/model/allocator.py)")
        terms += [
            Term("runtime", runtime_rss(), "Python + torch + libraries, measured here"),
            Term("mapped checkpoint", mapped, "weight files read via mmap stay resident"),
            Term("allocator slack", slack, note),
        ]
    terms += _cache_term(recipe, model, dtype, terms, device, device_memory, placement)  # last: it fits or not
    result = MemoryPlan(recipe=recipe.name or "recipe", device=device, seq_length=seq_length, seq_note=seq_note,
                        terms=terms, trainable_parameters=n_trainable)
    result.available, result.available_note = _available(device, device_memory)
    return result


CACHE_TERM = "dequantized weight cache"


def _forwards(recipe: Recipe) -> int:
    """Forwards trained per micro batch: AdaMix's consistency term adds one with other random routes (twice the
    saved activations and loss logits)."""
    t = recipe.training
    return 2 if recipe.adapter.method == "adamix" and recipe.adamix.consistency_weight > 0 and t.objective == "sft" \
        else 1


def _kept_note(config, dtype, in_place: bool) -> str:
    return "embeddings, norms, biases, untied head" \
        + (", MoE experts and routers (bitsandbytes quantizes nn.Linear only)" if moe_shape(config) else "") \
        + f" ({_dtype(dtype)})" + (", inside the mapped checkpoint" if in_place else "")


def _weights_note(quantized: int, packed: str) -> str:
    return "not quantized" if not quantized else {"gguf": "the GGUF file's blocks", "icq_nf4": "ICQ-NF4 codes, "
                                                  "absmax and tau"}.get(packed, "NF4 codes + quantization constants")


def _cache_term(recipe: Recipe, model, dtype, terms: list[Term], device: str, device_memory: int | None,
                placement) -> list[Term]:
    """quantization.cache_dequantized: a 4-bit base's dequantized weights kept between forwards
    (finetune/model/weight_cache.py), counted when on, or auto and the run predicted so far plus the cache stays
    within 90% of the memory available (what `finetune train` follows). An NF4 base caches on the CPU only, where
    bitsandbytes dequantizes twice a step, and within half the memory: it buys less there than for a GGUF base,
    and QLoRA's small footprint is why one chose it (on a GPU its kernels dequantize quickly anyway). A sharded
    NF4 base (FSDP / ZeRO-3) never caches. No term without a 4-bit base."""
    from finetune.model import dequantized_bytes

    if not recipe.quantization.load_in_4bit:
        return []
    size, choice = dequantized_bytes(model, dtype), recipe.quantization.cache_dequantized
    nf4 = not recipe.quantization.packed
    share = 0.5 if nf4 else 0.9  # NF4 gains less (1.02-1.07x; GGUF blocks dequantize slowly): within half the memory
    available = _available(device, device_memory)[0]
    fits = available is not None and sum(t.bytes for t in terms if t.counted) + size <= share * available
    if nf4 and placement.shards_parameters:
        return [Term(CACHE_TERM, size, "off: the 4-bit weights are sharded (FSDP / ZeRO-3)", counted=False)]
    if choice == "auto" and nf4 and device != "cpu":
        return [Term(CACHE_TERM, size, "quantization.cache_dequantized auto: off on a GPU (true turns it on)",
                     counted=False)]
    on = choice is True or (choice == "auto" and fits)
    why = "set" if choice != "auto" else (f"auto: fits within {share:.0%} of the memory" if fits else
                                          f"auto: off, would not fit within {share:.0%} of the memory")
    return [Term(CACHE_TERM, size, f"quantization.cache_dequantized {why} (same numbers either way)", counted=on)]


def _sequences_per_item(recipe: Recipe) -> int:
    """Sequences forwarded per micro-batch item: GRPO's G answers per prompt, a pair objective's two answers."""
    objective = recipe.training.objective
    return recipe.grpo.group_size if objective == "grpo" else 2 if objective in PAIR_OBJECTIVES else 1


def _loss_bytes(recipe: Recipe, tokens: int, vocab: int, hidden: int, width: int) -> tuple[int, str]:
    """The loss's working memory: chunked float32 logits at labelled positions, or a reward model's scores."""
    if recipe.training.objective == "reward":  # one float32 per position, and the hidden states the head reads
        return tokens * 4 + tokens * hidden * width, f"{tokens:,} scores of the reward head"
    chunk_rows = max(1, (64 * 2**20) // (4 * vocab))
    return (min(tokens, chunk_rows) * vocab * 4 + 2 * tokens * hidden * width,
            f"<= {min(tokens, chunk_rows)} rows of {vocab:,} logits")


# ------------------------------------------------------------------ environment


def _sequence_length(recipe: Recipe) -> tuple[int, str]:
    """The padded batch width to plan for: the data's longest example (capped), or max_length."""
    data = recipe.data
    if data.packing:
        return data.max_length, "packed rows of data.max_length"
    try:
        from finetune.data import prepare_data
        from finetune.model import load_tokenizer

        prepared = prepare_data(data, load_tokenizer(recipe.model, data.chat_template), recipe.training.seed)
    except FinetuneError as e:
        return data.max_length, f"data.max_length (data not read: {first_line(e)})"
    longest = max(prepared.stats.lengths, default=data.max_length)
    if recipe.training.padding_free and prepared.stats.lengths:
        k = recipe.training.micro_batch_size
        biggest = sum(sorted(prepared.stats.lengths)[-k:])  # the fullest possible row, unpadded
        return -(-biggest // k), f"padding-free rows: the {k} longest examples end to end are {biggest} tokens"
    if longest >= data.max_length:
        return data.max_length, "data.max_length (the data has examples that long)"
    return longest, f"longest training example (data.max_length is {data.max_length})"


def _available(device: str, given: int | None) -> tuple[int | None, str]:
    if given is not None:
        return given, "--device-memory"
    import torch

    if device == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return total, f"{torch.cuda.get_device_name()} total"
    try:
        import psutil

        return psutil.virtual_memory().available, "available RAM"
    except ImportError:
        return None, ""


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def print_plan(p: MemoryPlan, console) -> None:
    from rich.table import Table

    table = Table(title=f"predicted peak memory: {p.recipe} on {p.device}")
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("")
    for t in p.terms:
        style = "dim" if not t.counted else None
        table.add_row(t.name, f"{t.bytes / 2**30:.3f}", t.note, style=style)
    table.add_section()
    table.add_row("[bold]predicted peak[/]", f"[bold]{p.total / 2**30:.3f}[/]", "")
    if p.available is not None:
        table.add_row("available", f"{p.available / 2**30:.3f}", p.available_note)
    console.print(table)
    console.print(f"sequence length {p.seq_length}: {p.seq_note}", soft_wrap=True)
    console.print(f"verdict: {p.verdict}", soft_wrap=True)
