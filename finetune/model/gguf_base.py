"""A .gguf model fine-tuned as it is (`quantization.quant_type: gguf`; ModuLoRA's idea, arXiv 2309.16119): the
file's own quantized tensors are the frozen base, in no other rounding than the file's.

How it loads: the float model comes from the file's cached transformers conversion (gguf_in.py: config,
tokenizer, embeddings, norms, and every weight dequantized), then every linear layer whose tensor the file
stores in a block format finetune knows (finetune/quant: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) is
replaced by a `QuantLinear` holding that tensor's bytes, read straight from the file. Which GGUF tensor is which
layer, and how its rows are ordered, is transformers' own GGUF mapping (the tensor-name map, and its per-
architecture processor: Llama's q/k rows are stored rope-permuted, and a row permutation moves whole rows of
blocks, so the packed rows are reordered without touching a byte). Each packed layer is checked on load: its
dequantized weight must equal the float conversion's exactly, or the load stops naming the tensor. Embeddings
(Q8_0 in the Q4_1 SmolLM2 file) and norms stay in the compute dtype, with the file's values.

Between forwards only the packed bytes are kept; `cache_weights` (weight_cache.py) keeps the dequantized weights
instead where memory allows (same numbers, faster).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from finetune.errors import ModelError
from finetune.model.weight_cache import cache_weights, dequantized_bytes
from finetune.quant import Packed, QuantLinear, load_formats, quant_linears


def pack_gguf_base(model, path: str | Path, compute_dtype: torch.dtype) -> dict[str, int]:
    """Replace `model`'s linear layers (a float model converted from the GGUF file `path`) by QuantLinear layers
    over the file's blocks, in place; returns {format: layers packed}. On the meta device (finetune plan): layers
    of the right shapes and formats, no bytes read."""
    meta, packed = next(model.parameters()).device.type == "meta", {}
    for tensor, fmt, module_name, layer, order in _file_layers(model, path):
        rows, cols = tuple(layer.weight.shape)
        if meta:
            p = Packed(fmt.name, (rows, cols), {"blocks": torch.empty(
                rows, cols // fmt.block_size, fmt.type_size, dtype=torch.uint8, device="meta")})
        else:
            p = fmt.from_raw(np.array(tensor.data), (rows, cols))  # a copy: the reader's map is read-only
            p.data["blocks"] = p.data["blocks"][torch.from_numpy(order)].contiguous()
            if not torch.equal(fmt.dequantize(p, torch.float32).to(layer.weight.dtype), layer.weight.detach()):
                raise ModelError(f"{path}: the {fmt.name} blocks of {tensor.name} do not dequantize to the weights "
                                 f"transformers reads for {module_name}; cannot train on the file's own tensors "
                                 "(use quant_type nf4).")
        bias = layer.bias.detach() if layer.bias is not None else None
        quant = QuantLinear(p, bias, compute_dtype).to(layer.weight.device)
        quant.gguf_name, quant.gguf_rows = tensor.name, order  # where its rows are in the file (export/fold.py)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quant)
        packed[fmt.name] = packed.get(fmt.name, 0) + 1
    if not packed:
        raise ModelError(f"{path} stores no linear weight in a block format finetune reads "
                         f"({', '.join(load_formats())}); use quantization.quant_type nf4.")
    if not meta:  # the float conversion's file map held the replaced weights too: copy out what is left, freeing it
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    return packed


def _file_layers(model, path: str | Path):
    """(GGUF tensor, its format, module name, the model's linear layer, the file row of each layer row) for every
    linear layer the file stores in a known block format, as transformers maps GGUF tensors to parameters."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    parsed = {"config": model.config.to_dict(), "tensors": {}}  # the processors read head counts from it
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    names = get_gguf_hf_weights_map(model, processor)
    formats = load_formats()
    for tensor in reader.tensors:
        fmt = formats.get(tensor.tensor_type.name.lower())
        if fmt is None or len(tensor.shape) != 2:
            continue
        rows, cols = int(tensor.shape[1]), int(tensor.shape[0])  # ggml lists the row length first
        order, name = _row_order(processor, tensor.name, rows, names, parsed)
        module_name = names.get(name, "").removesuffix(".weight")
        try:
            layer = model.get_submodule(module_name) if module_name else None
        except AttributeError:  # a tensor transformers maps to no module of this model
            layer = None
        if order is not None and type(layer) is torch.nn.Linear and tuple(layer.weight.shape) == (rows, cols):
            yield tensor, fmt, module_name, layer, order


def _row_order(processor, name: str, rows: int, names: dict, parsed: dict) -> tuple[np.ndarray | None, str]:
    """Where each row of the model's weight comes from in the file (transformers' processing of an index
    column: its reverse rope permutation for Llama q/k), and the tensor's name after processing. None when the
    processing is not a pure row permutation (then the layer stays float)."""
    index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    result = processor.process(weights=index, name=name, tensor_key_mapping=names, parsed_parameters=parsed)
    order = np.asarray(result.weights)
    if order.shape != (rows, 1) or not np.array_equal(np.sort(order[:, 0]), index[:, 0]):
        return None, result.name
    return order[:, 0].astype(np.int64), result.name


def cache_for_inference(model, choice) -> bool:
    """eval, chat and serve: keep the dequantized weights when `choice` (quantization.cache_dequantized) is true, or
    auto and they take at most half the memory free on the model's device; returns whether it did."""
    layers = quant_linears(model)
    if not layers or choice is False:
        return False
    first = next(iter(layers.values()))
    need = dequantized_bytes(model, first.compute_dtype)
    if choice == "auto" and need > _free_bytes(first.packed_blocks_device()) / 2:
        return False
    cache_weights(model, first.compute_dtype)
    return True


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return 0
