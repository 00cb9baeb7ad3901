"""The frozen base in IR-QLoRA's ICQ-NF4 (`quantization.quant_type: icq_nf4`; the format: finetune/quant/icq.py).

The float model is loaded in float32, and every linear layer bitsandbytes would quantize (all but the ones
transformers keeps in float: the output head, a reward model's score) becomes a `QuantLinear` over its ICQ-NF4
packing: NF4 codes of w - tau with a per-block shift tau searched for the most code entropy. The remaining float
weights (embeddings, norms, the head) are then cast to the compute dtype, as a 4-bit bitsandbytes base keeps them.

The search costs about a minute of CPU per 100M weights, so its result is cached on disk, keyed by the sha256
of the weights it quantizes (and the format's version): training, resume, eval, chat and merge of one base
pay for it once, and a changed base file can never pick up another's packing. On the meta device (`finetune
plan`) layers of the right shapes are built and nothing is computed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from finetune.errors import FinetuneError
from finetune.quant import Packed, QuantLinear, get_format

FORMAT = "icq_nf4"
VERSION = "icq_nf4/1"  # bump when the search or the packing changes: old cache entries are then never read
PACKED_KEYS = ("codes", "absmax", "tau")


def cache_root() -> Path:
    return Path(os.environ.get("FINETUNE_ICQ_CACHE", Path.home() / ".cache" / "finetune" / "icq"))


def quantizable(model) -> dict[str, torch.nn.Linear]:
    """The linear layers a 4-bit base quantizes: every nn.Linear but those transformers keeps in float
    (get_keys_to_not_convert: the output head, tied or not, and a reward model's score), input sizes a
    multiple of the 64-value block."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = set(get_keys_to_not_convert(model))
    block = get_format(FORMAT).block_size
    return {name: m for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and not (set(name.split(".")) & keep) and m.in_features % block == 0}


def pack_icq_base(model, compute_dtype: torch.dtype) -> int:
    """Replace `model`'s quantizable linear layers (model loaded in float32) by ICQ-NF4 QuantLinear layers, in
    place, and cast its other floating-point parameters to `compute_dtype`; returns the number of layers packed."""
    layers = quantizable(model)
    meta = next(model.parameters()).device.type == "meta"
    packed = _meta_packing(layers) if meta else _cached_packing(layers)
    for name, layer in layers.items():
        bias = layer.bias.detach() if layer.bias is not None else None
        quant = QuantLinear(packed[name], bias, compute_dtype).to(layer.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quant)
    for p in model.parameters():  # embeddings, norms, head: the compute dtype, as around bitsandbytes layers
        if p.is_floating_point() and p.dtype != compute_dtype:
            p.data = p.data.to(compute_dtype)
    return len(layers)


def _meta_packing(layers: dict) -> dict[str, Packed]:
    out = {}
    for name, m in layers.items():
        rows, cols = m.out_features, m.in_features
        blocks = cols // get_format(FORMAT).block_size
        out[name] = Packed(FORMAT, (rows, cols), {
            "codes": torch.empty(rows, cols // 2, dtype=torch.uint8, device="meta"),
            "absmax": torch.empty(rows, blocks, dtype=torch.float32, device="meta"),
            "tau": torch.empty(rows, blocks, dtype=torch.float16, device="meta")})
    return out


def _cached_packing(layers: dict) -> dict[str, Packed]:
    """Each layer's ICQ-NF4 packing: from the cache when the same weights were packed before, else computed and
    written there (atomically; an unwritable cache only costs the recomputation next time)."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(VERSION.encode())
    for name, m in layers.items():
        digest.update(f"{name}:{tuple(m.weight.shape)}:{m.weight.dtype}".encode())
        digest.update(m.weight.detach().float().contiguous().cpu().numpy().tobytes())
    path = cache_root() / f"{digest.hexdigest()[:24]}.safetensors"
    if path.is_file():
        saved = load_file(path)
        return {name: Packed(FORMAT, (m.out_features, m.in_features),
                             {k: saved[f"{name}.{k}"] for k in PACKED_KEYS}) for name, m in layers.items()}
    fmt = get_format(FORMAT)
    out = {name: fmt.pack(m.weight.detach().float().cpu()) for name, m in layers.items()}
    try:
        from finetune.artifacts import atomic_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({f"{name}.{k}": p.data[k].contiguous() for name, p in out.items() for k in PACKED_KEYS}, tmp)
    except (OSError, FinetuneError):  # a cache that cannot be written is not an error
        pass
    return out
