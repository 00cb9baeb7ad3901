"""The decode step's weights (finetune/generate/lean.py): a 4-bit weight dequantized once, to the compute dtype,
with the op bitsandbytes' own CPU matmul uses (`dense_weight`); a float32 weight, and a bf16 one where oneDNN packs
bf16, in oneDNN's pre-packed layout (`pack`, `packed_weight`: what inductor's freezing gives CPU linears), kept on
the parameter while it lives, one copy however many decode steps read it; on a CPU where the plain weight's product
is faster for one or two rows (`plain_rows`, measured once per process), the plain weight kept beside it for those;
and what each of these costs in memory, checked against what is free before it is done.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F

DENSE = "_finetune_dense"  # the attribute of a 4-bit parameter holding its dequantized weight
PACKED = "_finetune_packed"  # the attribute of a parameter holding its weight packed for oneDNN (`pack`)
PACK_ROWS = 16  # the rows oneDNN's layout is blocked for: measured fastest at 1, 4 and 16 rows alike


def base_model(model):
    """The transformers model under PEFT's wrappers (also once every adapter is deleted)."""
    if not hasattr(model, "peft_config"):
        return model
    return getattr(model.base_model, "model", model.base_model)


def dense_weight(layer, keep: bool = True) -> torch.Tensor:
    """The layer's weight in its compute dtype: a bitsandbytes 4-bit weight dequantized (what its CPU matmul
    dequantizes on every call), kept while the parameter lives when `keep`; a float weight as it is."""
    weight = layer.weight
    if type(weight).__name__ != "Params4bit":
        return weight.detach()
    dense = getattr(weight, DENSE, None)
    if dense is None:
        import bitsandbytes.functional as bnbf

        dense = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(layer.compute_dtype or torch.float32)
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
    """x W^T + b for 2-D x with W packed by `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


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


PROBE = (6, 1024, 4096)  # weights x out x in: 96 MB in float32, past the caches as a model's weights are


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
    count, out, width = PROBE
    weights = [torch.randn(out, width).to(dtype) for _ in range(count)]
    packed = [pack(w) for w in weights]
    best = 0
    with torch.inference_mode():
        for rows in (1, 2):
            x = torch.randn(rows, width).to(dtype)
            plain, onednn = [], []
            for _ in range(4):  # alternating, so a busy moment costs both; the first (warm-up) dropped
                plain.append(_timed(lambda: [F.linear(x, w) for w in weights]))
                onednn.append(_timed(lambda: [packed_product(x, w) for w in packed]))
            plain, onednn = plain[1:], onednn[1:]
            if statistics.median(plain) > 0.85 * statistics.median(onednn):
                break
            best = rows
    return best


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def dense_bytes(model) -> int:
    """Bytes the 4-bit weights of `model` not yet kept dequantized take once dequantized (0: none)."""
    size = torch.empty((), dtype=compute_dtype(model)).element_size()
    return sum(m.weight.quant_state.shape.numel() * size for m in model.modules()
               if type(getattr(m, "weight", None)).__name__ == "Params4bit" and not hasattr(m.weight, DENSE))


def pack_bytes(model) -> int:
    """Bytes packing the weights of `model` not yet packed adds: a copy of each float weight (a 4-bit one's dense
    copy is replaced, already counted by `dense_bytes`)."""
    size = torch.empty((), dtype=compute_dtype(model)).element_size()
    return sum(m.weight.numel() * size for m in model.modules()
               if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Params4bit"
               and not hasattr(m.weight, PACKED))


def plain_bytes(model) -> int:
    """Bytes a plain copy of every projection's and the head's weight takes in the compute dtype (`plain_rows`: kept
    beside the packed ones)."""
    size = torch.empty((), dtype=compute_dtype(model)).element_size()
    return sum(m.in_features * m.out_features * size for m in model.modules() if isinstance(m, torch.nn.Linear))


def fold_bytes(model) -> int:
    """Bytes of the projections' weights in the compute dtype: what folding an adapter into them copies."""
    size = torch.empty((), dtype=compute_dtype(model)).element_size()
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
