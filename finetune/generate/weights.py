"""The decode step's weights (finetune/generate/lean.py): a 4-bit weight dequantized once, to the compute dtype,
with the op bitsandbytes' own CPU matmul uses (`dense_weight`); a float32 weight, and a bf16 one where oneDNN packs
bf16, in oneDNN's pre-packed layout (`pack`, `packed_weight`: what inductor's freezing gives CPU linears), kept on
the parameter while it lives, one copy however many decode steps read it; on a CPU where the plain weight's product
is faster for one or two rows (`plain_rows`, measured once per process), the plain weight kept beside it for those;
with FINETUNE_DECODE_WEIGHTS=int8, an int8 copy for the decode step's few-row products (`int8_weight`, `int8_rows`);
and what each of these costs in memory, checked against what is free before it is done.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.model import linear4bit_weight

DENSE = "_finetune_dense"  # the attribute of a 4-bit parameter holding its dequantized weight
PACKED = "_finetune_packed"  # the attribute of a parameter holding its weight packed for oneDNN (`pack`)
INT8 = "_finetune_int8"  # the attribute of a parameter holding its int8 copy (`layer_int8`)
FUSED = "_finetune_fused"  # ... of each parameter of a group, holding the group's weights stacked and packed
FUSED_INT8 = "_finetune_fused_int8"  # ... and their int8 copy (`fused_packed`, `fused_int8`)
DECODE_WEIGHTS = "FINETUNE_DECODE_WEIGHTS"  # exact (the default) or int8
PACK_ROWS = 16  # the rows oneDNN's layout is blocked for: measured fastest at 1, 4 and 16 rows alike
WIN = 0.85  # a faster product is taken where it takes at most this share of the other's time (`_up_to`)
# ... and int8 where it also holds the adapter: the adapter's products beside the exact weights go with it (a quarter
# of an exact bf16 token on a 2-core AVX512_BF16 EPYC), so int8's may even be slower. There the probe measured int8
# at 0.67-1.05x the packed bf16 product at one row, process to process, while int8 steps always took 0.48-0.57x
# the exact step's time (docs/performance.md)
FOLD_WIN = 1.25


def base_model(model):
    """The transformers model under PEFT's wrappers (also once every adapter is deleted)."""
    if not hasattr(model, "peft_config"):
        return model
    return getattr(model.base_model, "model", model.base_model)


def dense_weight(layer, keep: bool = True) -> torch.Tensor:
    """The layer's weight in its compute dtype: a bitsandbytes 4-bit weight dequantized (what its CPU matmul
    dequantizes on every call), kept while the parameter lives when `keep`; a float weight as it is. A layer
    training already keeps dequantized (finetune/model/weight_cache.py, e.g. GRPO's rollouts) lends its copy."""
    weight = layer.weight
    if type(weight).__name__ != "Params4bit":
        return weight.detach()
    kept = getattr(layer, "cached_weight", None)
    if kept is not None and kept.dtype == (layer.compute_dtype or torch.float32):
        return kept
    dense = getattr(weight, DENSE, None)
    if dense is None:
        dense = linear4bit_weight(layer, layer.compute_dtype or torch.float32)
        if keep:
            setattr(weight, DENSE, dense)
    return dense


def compute_dtype(model) -> torch.dtype:
    base = base_model(model)
    return base.get_input_embeddings().weight.dtype


def packable(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` are packed for oneDNN: float32 where this torch has oneDNN; bf16 where oneDNN also
    packs it (CPUs with AVX512_BF16 or AMX: 1.5x faster at one row and 1.7-1.9x at 4 to 16 rows than the plain bf16
    weight on an AVX512_BF16 EPYC, docs/performance.md; an AVX2 CPU refuses it)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _packs_bf16())


@functools.cache
def _packs_bf16() -> bool:
    return pack(torch.zeros(PACK_ROWS, PACK_ROWS, dtype=torch.bfloat16)) is not None


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] in oneDNN's blocked layout for `PACK_ROWS`-row inputs (None where oneDNN refuses it)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)
    except RuntimeError:
        return None


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b for 2-D x with W packed by `pack`. Inside torch.compile it is `finetune::packed_linear`, an op
    inductor calls as it is: its own lowering of oneDNN's product takes only weights frozen into the graph, and fails
    on ours, which are the step's inputs (FINETUNE_DECODE_COMPILE=1 fell back to eager on every packed weight)."""
    if torch.compiler.is_compiling():
        return _packed_linear(x, packed, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.library.custom_op("finetune::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@_packed_linear.register_fake
def _(x, packed, bias):
    return x.new_empty(x.shape[0], packed.shape[0])


def packed_weight(layer, keep_plain: bool = False) -> torch.Tensor | None:
    """The layer's weight packed (`pack`), kept on the parameter while it lives (one copy however many lean models
    read it); a 4-bit weight is dequantized for it and its dense copy dropped (the packed one replaces it) unless
    `keep_plain` (`plain_rows`: the plain weight runs one-row products)."""
    param = layer.weight
    got = getattr(param, PACKED, None)
    if got is None:
        got = pack(dense_weight(layer, keep=keep_plain))
        if got is None:
            return None
        setattr(param, PACKED, got)
    if hasattr(param, DENSE) and not keep_plain:  # (kept by an earlier use without packing)
        delattr(param, DENSE)
    return got


def fused_packed(layers: list) -> torch.Tensor | None:
    """The weights of `layers` (projections reading one input: q, k and v; gate and up) stacked by rows and packed
    (`pack`): one product for all of them instead of one each, whose columns are each projection's own product to
    the bit (oneDNN, MKL and the int8 kernel, 1 to 200 rows, float32 and bf16, checked on a 2-core AVX512_BF16 EPYC;
    tests/test_generate_path.py checks it where it runs). The packed products of SmolLM2's q/k/v took 0.77 ms a
    token as one against 1.55 as three there (bf16; gate/up 2.33 against 2.81): most of a small product is its
    set-up. Kept on every one of the parameters while they live; their dense copies (and packed ones, made by a
    lean model that did not stack them) are dropped. None where oneDNN refuses the dtype."""
    got = getattr(layers[0].weight, FUSED, None)
    if got is None:
        got = pack(torch.cat([dense_weight(layer, keep=False) for layer in layers]))
        if got is None:
            return None
    for layer in layers:
        setattr(layer.weight, FUSED, got)
        for name in (DENSE, PACKED):
            if hasattr(layer.weight, name):
                delattr(layer.weight, name)
    return got


def fused_int8(layers: list, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_int8` for the weights of `layers` stacked by rows (as `fused_packed`), kept on each parameter."""
    got = getattr(layers[0].weight, FUSED_INT8, None)
    if got is None:
        got = int8_weight(torch.cat([dense_weight(layer, keep=keep) for layer in layers]))
        for layer in layers:
            setattr(layer.weight, FUSED_INT8, got)
    return got


PROBE = (1024, 4096)  # out x in of each probe weight (`probe_count` of them)


@functools.cache
def probe_count(size: int) -> int:
    """How many `PROBE` weights the speed probes stream per product: enough that in their smallest format compared
    (`size` bytes per weight: 1 for int8) they are twice the CPU's last-level cache, as a model's weights are past
    it, 6 to 16. With 6 (24 MB of int8) on a 2-core EPYC with 32 MB of L3 the int8 side partly stayed in the
    cache: the probe measured int8 at 0.67-0.80x the packed bf16 product's time at one row, SmolLM2's own weights
    0.86x. (Between processes it still moves, 0.67-1.05x with 16: `FOLD_WIN`.)"""
    return min(16, max(6, -(-2 * _last_cache_bytes() // (PROBE[0] * PROBE[1] * size))))


def _last_cache_bytes() -> int:
    """The largest CPU cache's size (Linux sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        try:
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
        except (ValueError, IndexError):
            continue
    return max(sizes, default=32 * 2**20)


@functools.cache
def plain_rows(dtype: torch.dtype) -> int:
    """Up to how many rows (0, 1 or 2) the plain weight's product beats the packed one's on this CPU, by 15% or
    more, measured once per process on weights too large for the caches (decoding reads every weight once per token,
    so a product of one or two rows is bound by memory). Which kernel streams a weight faster differs by CPU: on a
    2-core Intel Xeon (Ice Lake, AVX512 without BF16) MKL's product on the plain float32 weight took 22-25 ms per
    SmolLM2-135M token at one or two rows, oneDNN's on the packed weight 32-35 ms, and the packed one won from 4
    rows; on AMD EPYCs (AVX2, AVX512_BF16) the packed one won at every row count (docs/performance.md, Decoding)."""
    if not packable(dtype):
        return 0
    weights, generator = _probe_weights(dtype, dtype.itemsize)
    packed = [pack(w) for w in weights]
    return _up_to(_ratios((1, 2), dtype, generator, lambda x: [F.linear(x, w) for w in weights],
                          lambda x: [packed_product(x, w) for w in packed]), WIN)


def int8_requested() -> bool:
    """Whether FINETUNE_DECODE_WEIGHTS asks for int8 decode weights (`int8_weight`); anything but exact or int8 is
    refused, naming the variable."""
    from finetune.errors import RecipeError

    value = os.environ.get(DECODE_WEIGHTS, "").strip().lower()
    if value in ("", "exact"):
        return False
    if value == "int8":
        return True
    raise RecipeError(f"environment variable {DECODE_WEIGHTS}={os.environ[DECODE_WEIGHTS]!r}: expected 'exact' "
                      "(the default: the decode step computes what the model's forward computes) or 'int8' (weights "
                      "rounded to int8 per output row for the decode step's few-row products: faster, not the same "
                      "numbers).")


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] as int8 [out, in] and a bf16 scale per output row: each row's largest magnitude maps to 127
    (symmetric, round to nearest), as torch's weight-only int8 product (`int8_product`) reads it.

    What it costs in accuracy (SmolLM2-135M-Instruct, 1262 GSM8K tokens decoded one by one through the decode step,
    `scripts/bench_decode_weights.py --accuracy`): the next token agrees with the exact weights' 95.3% of the time,
    KL 0.0050 per token; on the model's NF4 form (what a QLoRA adapter trains on) 96.6%, 0.0047, against the 0.244
    that NF4's own rounding costs the float32 model. llama.cpp's q8_0 (blocks of 32) costs 0.0012 on the float32
    model (docs/performance.md)."""
    w = weight.detach().float()
    # the scale as it is kept (bf16), so q * scale is the nearest point of the grid the product uses
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale


def layer_int8(layer, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight as `int8_weight` gives it, kept on the parameter while it lives (one copy however many lean
    models read it); a 4-bit weight is dequantized for it, its dense copy kept when `keep` (`dense_weight`)."""
    got = getattr(layer.weight, INT8, None)
    if got is None:
        got = int8_weight(dense_weight(layer, keep=keep))
        setattr(layer.weight, INT8, got)
    return got


def int8_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x W^T for 2-D x with W as `int8_weight` gives it: torch's weight-only int8 kernel, the activations as bf16
    (its vectorized form; float32 activations take a scalar loop 7x slower here), the result in x's dtype."""
    if x.dtype == torch.bfloat16:  # a bf16 model's: no conversions (at one row every op's call counts)
        return torch._weight_int8pack_mm(x, q, scale)
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scale).to(x.dtype)


def int8_available() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


def int8_rows(dtype: torch.dtype, bar: float = WIN) -> int:
    """Up to how many rows (0, 1, 2, 4, 8 or 16) the int8 product (`int8_product`) takes at most `bar` of the time of
    the product the decode step otherwise takes (the faster of the plain and the oneDNN-packed weight in `dtype`),
    measured once per process on `probe_count` `PROBE` weights. On a 2-core Intel Xeon (Ice Lake) it took 12 ms per
    SmolLM2-135M token at one row against 23 (plain float32) and 35 (packed), and lost from 16 rows; on a 2-core
    AVX512_BF16 EPYC 5.9 ms against 6.9 (packed bf16): not 15% faster, yet with the adapter folded into it the step
    took 9.0 ms a token against 16 (docs/performance.md, Decoding), hence `FOLD_WIN`."""
    return _up_to(int8_ratios(dtype), bar)


@functools.cache
def int8_ratios(dtype: torch.dtype) -> dict[int, float]:
    if not int8_available():
        return {}
    weights, generator = _probe_weights(dtype, 1)
    quantized = [int8_weight(w) for w in weights]
    exact = [lambda x: [F.linear(x, w) for w in weights]]
    if packable(dtype):
        packed = [pack(w) for w in weights]
        exact.append(lambda x: [packed_product(x, w) for w in packed])
    return _ratios((1, 2, 4, 8, 16), dtype, generator, lambda x: [int8_product(x, q, s) for q, s in quantized],
                   *exact)


def _probe_weights(dtype: torch.dtype, size: int) -> tuple[list[torch.Tensor], torch.Generator]:
    """`probe_count(size)` `PROBE` weights in `dtype`, and the generator they came from (the probe's inputs come from
    it too)."""
    count, (out, width) = probe_count(size), PROBE
    generator = torch.Generator().manual_seed(0)
    return [_random(out, width, dtype, generator) for _ in range(count)], generator


def _ratios(counts: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, fast, *others) -> dict:
    """{rows: the best time of fast(x) over that of the fastest of others(x)} for `counts` (ascending row counts),
    up to the first over every bar (`FOLD_WIN`). Each is timed 8 times, alternating; the first round (a warm-up) is
    dropped and each side's best kept, since a busy moment only adds time (medians of 4 rounds once turned a 0.75
    into 3.9, and a bench process twice saw int8 lose at one row where every other run measured 0.67-0.72)."""
    ratios = {}
    with torch.inference_mode():
        for rows in counts:
            x = _random(rows, PROBE[1], dtype, generator)
            mine, theirs = [], []
            for _ in range(8):
                mine.append(_timed(lambda: fast(x)))
                theirs.append(min(_timed(lambda: other(x)) for other in others))
            ratios[rows] = min(mine[1:]) / min(theirs[1:])
            if ratios[rows] > max(WIN, FOLD_WIN):
                break
    return ratios


def _up_to(ratios: dict[int, float], bar: float) -> int:
    """The largest row count up to which every ratio is at most `bar` (0: none)."""
    best = 0
    for rows, ratio in ratios.items():
        if ratio > bar:
            break
        best = rows
    return best


def _random(rows: int, width: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random numbers for a probe from its own generator: the global one (dropout, sampling, the stream a resumed
    run must continue) is left where it was."""
    return torch.randn(rows, width, generator=generator).to(dtype)


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def dense_bytes(model) -> int:
    """Bytes the 4-bit weights of `model` not yet kept dequantized (here, or by training's cache) take once
    dequantized (0: none)."""
    size = compute_dtype(model).itemsize
    return sum(m.weight.quant_state.shape.numel() * size for m in model.modules()
               if type(getattr(m, "weight", None)).__name__ == "Params4bit" and not hasattr(m.weight, DENSE)
               and getattr(getattr(m, "base_layer", m), "cached_weight", None) is None)


def pack_bytes(model) -> int:
    """Bytes packing the weights of `model` not yet packed adds: a copy of each float weight (a 4-bit one's dense
    copy is replaced, already counted by `dense_bytes`)."""
    size = compute_dtype(model).itemsize
    return sum(m.weight.numel() * size for m in model.modules()
               if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Params4bit"
               and not hasattr(m.weight, PACKED) and not hasattr(m.weight, FUSED))


def plain_bytes(model) -> int:
    """Bytes a plain copy of every projection's and the head's weight takes in the compute dtype (`plain_rows`: kept
    beside the packed ones)."""
    size = compute_dtype(model).itemsize
    return sum(m.in_features * m.out_features * size for m in model.modules() if isinstance(m, torch.nn.Linear))


def int8_bytes(model) -> int:
    """Bytes an int8 copy of every projection's and the head's weight takes (`int8_weight`: 1 per weight, a scale per
    row)."""
    return sum(m.out_features * (m.in_features + 2) for m in model.modules() if isinstance(m, torch.nn.Linear))


def fold_bytes(model) -> int:
    """Bytes of the projections' weights in the compute dtype: what folding an adapter into them copies."""
    size = compute_dtype(model).itemsize
    total = 0
    for module in model.modules():
        if type(module).__name__ in ("Linear", "Linear4bit") and hasattr(module, "lora_A"):
            total += module.in_features * module.out_features * size
    return total


def fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` more fit in half the memory available now (the rest is the caches', and others')."""
    if nbytes == 0:
        return True
    try:
        import psutil
    except ImportError:
        return False
    return nbytes <= psutil.virtual_memory().available // 2
