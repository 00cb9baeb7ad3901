"""Exact 4-bit export: a QA-LoRA checkpoint trained on a Q4_1 (Q5_1) GGUF file's own blocks, written as that file
with the update folded into every block's offset.

Why it is exact: QA-LoRA pools the adapter's input over groups of N inputs, so its update is constant within
each group (finetune/quant/peft_layers.py: delta W[o, i] = c (B A)[o, i // N]); with N a multiple of the block
size (32) it is one constant U per block, and a Q4_1/Q5_1 block x = d q + m becomes d q + (m + U). The scales d
and the codes q are copied byte for byte; m + U is rounded to m's fp16, the only error left. Everything else in
the file (metadata, tokenizer, embedding, norms, tensor order and alignment) is copied from the source with
gguf's reader and writer, so the result has the source's size and tensor types. Llama's q/k rows are stored
rope-permuted in the file: each update row goes to the file row the layer's row was loaded from
(QuantLinear.gguf_rows, set by finetune/model/gguf_base.py).

`exact_fold` says, from the checkpoint's recipe and the file's header, whether a checkpoint folds into `--type`
(and if not, why: the ordinary export then merges and re-quantizes, and its report carries that reason).
Proof (in the report): the file is read back and compared with the source tensor by tensor (types, shapes,
scale and code bytes), the offsets' fp16 rounding is measured, and transformers' reading of the file gives
logits compared with the trained model (packed base + adapter, float32) on the probe batch.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import torch

from finetune.artifacts import atomic_file
from finetune.errors import ModelError
from finetune.merge import peak_rss_mib, probe_batch

ADAPTER = "a0"


def exact_fold(source: Path, type: str) -> tuple[bool, str | None]:
    """(whether the checkpoint `source` folds exactly into a `type` file, why not when it is QA-LoRA but does not)."""
    from finetune.model import saved_recipe
    from finetune.quant import load_formats

    recipe = saved_recipe(source)
    lora, quant = recipe.get("lora") or {}, recipe.get("quantization") or {}
    if not lora.get("use_qalora"):
        return False, None
    base = str((recipe.get("model") or {}).get("name_or_path", ""))
    redo = f"merged and re-quantized to {type} instead"
    if quant.get("quant_type") != "gguf" or quant.get("load_in_4bit") is False or not base.endswith(".gguf"):
        return False, f"not folded: this QA-LoRA checkpoint was not trained on a GGUF file's own blocks " \
                      f"(quantization.quant_type gguf), so there are no blocks to fold into; {redo}"
    fmt = load_formats().get(type)
    if fmt is None or not fmt.folds_exactly:
        return False, f"not folded: {type} has no per-block offset (only q4_1 and q5_1 fold exactly); {redo}"
    kinds = _layer_types(Path(base))
    if kinds != {type}:
        return False, f"not folded: {Path(base).name} stores its layers as {', '.join(sorted(kinds))}, not {type} " \
                      f"(an offset quantized to 6 bits, as in the K-quants, or none, cannot take the update exactly); {redo}"
    n = int(lora.get("qalora_group_size", 0))
    if n % fmt.block_size:
        return False, f"not folded: lora.qalora_group_size {n} is not a multiple of the {type} block ({fmt.block_size}), " \
                      f"so the update is not constant within each block; {redo}"
    if lora.get("bias", "none") != "none" or lora.get("modules_to_save"):
        return False, f"not folded: the checkpoint also trains biases or whole modules, which no offset holds; {redo}"
    return True, None


def _layer_types(path: Path) -> set[str]:
    import gguf

    if not path.is_file():
        raise ModelError(f"The checkpoint's base model {path} does not exist: export folds into that file.")
    reader = gguf.GGUFReader(str(path))
    return {t.tensor_type.name.lower() for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}


def export_folded(source: Path, out: Path, type: str, probes: list[str]) -> dict:
    """Write the base GGUF with `source`'s QA-LoRA update folded into its offsets and prove it: the export report's
    fields (gguf.py's ExportReport), `fold` holding the file facts and the offsets' rounding."""
    from finetune.model import check_adapter_dir, load_adapter_tokenizer, saved_recipe

    check_adapter_dir(source)
    recipe = saved_recipe(source)
    base = Path(recipe["model"]["name_or_path"])
    trained = _trained(source, recipe)
    updates = folded_updates(trained, type)
    tok, _ = load_adapter_tokenizer(source, str(base))
    probe = probe_batch(tok)
    with torch.no_grad():
        reference = trained(**probe).logits.float()
        unrounded = _unrounded_logits(trained, probe)
    del trained
    gc.collect()
    with atomic_file(out, out.with_name(f".{out.stem}.partial-{os.getpid()}.gguf")) as partial:
        rounding, notes = write_folded(base, partial, updates, tok.chat_template)
        facts = compare_files(base, partial, updates)
        fields = {"architecture": facts.pop("architecture"), "tokenizer": facts.pop("tokenizer"),
                  "base_weights": f"folded into {base.name}'s own {type} blocks", "tensors": facts["tensors"],
                  "size_bytes": partial.stat().st_size, "write_peak_rss_mib": peak_rss_mib(),
                  "fold": {**facts, **rounding, "source": str(base)},
                  "notes": [f"QA-LoRA folded exactly into {facts['folded_tensors']} {type} tensors of {base.name}: "
                            f"scales and codes byte-identical: {facts['scales_and_codes_identical']}, same size: "
                            f"{facts['same_size']}, same tensor types: {facts['same_types']}; the only rounding, "
                            f"m + U to fp16: max {rounding['offset_rounding_max']:.3g}", *notes]}
        fields.update(_prove(partial, tok, probes, probe, reference, unrounded))
    parts = fields["fidelity_parts"]
    fields["notes"].insert(1, "where the logit difference comes from: the fold without rounding vs the trained model "
                           f"{parts['unrounded_fold_vs_trained']['max_abs_logit_diff']:.2g} (float arithmetic), the "
                           f"file vs that {parts['file_vs_unrounded_fold']['max_abs_logit_diff']:.2g} (the offsets' "
                           "fp16 rounding)")
    return fields


def _unrounded_logits(trained, probe) -> torch.Tensor:
    """The logits of the fold without its one rounding: every QA-LoRA layer's weight set to dequant(blocks) + its
    update in float32 (m + U kept unrounded), adapters off. Leaves `trained` with those weights (discarded after)."""
    from peft.tuners.lora import LoraLayer

    for layer in trained.base_model.model.modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            base = layer.get_base_layer()
            base.cache(None)
            base.cached_weight = base.dequantized(torch.float32) + layer.get_delta_weight(ADAPTER).float()
    with trained.disable_adapter():
        return trained(**probe).logits.float()


def _trained(source: Path, recipe: dict):
    """The model as trained: the file's packed blocks + the adapter, in float32 on CPU."""
    from finetune.model import attach_saved_adapter, cache_weights, load_base_model, resolve
    from finetune.recipe import QuantizationSection

    quant = QuantizationSection.model_validate(recipe["quantization"]).model_copy(update={"compute_dtype": "float32"})
    base = load_base_model(recipe["model"]["name_or_path"], quant, "cpu", resolve(quant))
    cache_weights(base, torch.float32)  # one forward: dequantizing once is the same numbers
    return attach_saved_adapter(base, source, ADAPTER).eval()


def folded_updates(model, type: str) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: the per-block update (file rows, blocks)} of every QA-LoRA layer over a `type` QuantLinear."""
    from peft.tuners.lora import LoraLayer

    from finetune.quant import QuantLinear, block_delta, get_format, is_qalora

    updates = {}
    for name, layer in model.base_model.model.named_modules():
        if not (isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A):
            continue
        base = layer.get_base_layer()
        if not (is_qalora(layer, ADAPTER) and isinstance(base, QuantLinear) and base.format == type):
            raise ModelError(f"{name} is not a QA-LoRA layer over {type} blocks; cannot fold it.")
        delta = block_delta(layer, ADAPTER, get_format(type).block_size)
        in_file = torch.empty_like(delta)
        in_file[torch.as_tensor(base.gguf_rows)] = delta  # model row j was read from file row gguf_rows[j]
        updates[base.gguf_name] = in_file
    return updates


def write_folded(src: Path, path: Path, updates: dict[str, torch.Tensor], chat_template: str | None):
    """Copy the GGUF `src` to `path` with `updates` folded into their tensors' offsets; returns the offsets' fp16
    rounding ({offset_rounding_max, offset_rounding_mean, update_max_abs}) and notes."""
    import gguf

    from finetune.quant import get_format

    reader = gguf.GGUFReader(str(src))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(path, arch=arch, endianess=reader.endianess)
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    notes = []
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer's own
        value, kind = field.contents(), field.types[0]
        if field.name == gguf.Keys.Tokenizer.CHAT_TEMPLATE and chat_template and chat_template != value:
            value = chat_template
            notes.append("the chat template is the checkpoint's (data.template), not the base file's")
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY
                             else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    worst, total, count, largest = 0.0, 0.0, 0, 0.0
    for t in reader.tensors:
        data = t.data
        if t.name in updates:
            fmt = get_format(t.tensor_type.name.lower())
            p = fmt.from_raw(np.array(data), (int(t.shape[1]), int(t.shape[0])))
            folded = fmt.fold(p, updates[t.name])
            wanted = fmt.offsets(p).double() + updates[t.name].double()
            error = (fmt.offsets(folded).double() - wanted).abs()
            worst, total, count = max(worst, error.max().item()), total + error.sum().item(), count + error.numel()
            largest = max(largest, updates[t.name].abs().max().item())
            data = folded.data["blocks"].reshape(data.shape).numpy()
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return {"offset_rounding_max": worst, "offset_rounding_mean": total / max(count, 1),
            "update_max_abs": largest}, notes


def compare_files(src: Path, out: Path, updates: dict) -> dict:
    """The folded file read back against its source: same tensors, types and shapes, same size; in the folded
    tensors every byte but the offsets' equal; the others byte-identical."""
    import gguf

    from finetune.quant import get_format

    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    same_types = [(t.name, t.tensor_type, tuple(t.shape)) for t in a.tensors] == \
                 [(t.name, t.tensor_type, tuple(t.shape)) for t in b.tensors]
    kept, identical, changed = True, 0, 0
    for ta, tb in zip(a.tensors, b.tensors):
        x, y = np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)
        if ta.name not in updates:
            identical += int(np.array_equal(x, y))
            continue
        fmt = get_format(ta.tensor_type.name.lower())
        x, y = x.reshape(-1, fmt.type_size), y.reshape(-1, fmt.type_size)
        offset = np.zeros(fmt.type_size, dtype=bool)
        offset[fmt.offset_at:fmt.offset_at + 2] = True
        kept &= bool(np.array_equal(x[:, ~offset], y[:, ~offset]))
        changed += int((x[:, offset] != y[:, offset]).any(axis=1).sum())
    fields = a.fields
    return {"architecture": bytes(fields["general.architecture"].parts[-1]).decode(),
            "tokenizer": {"model": fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else "",
                          "pre": fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "",
                          "tokens": len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else 0,
                          "chat_template": "tokenizer.chat_template" in fields},
            "tensors": len(b.tensors), "folded_tensors": len(updates), "same_types": same_types,
            "same_size": src.stat().st_size == out.stat().st_size, "scales_and_codes_identical": kept,
            "other_tensors_identical": identical == len(a.tensors) - len(updates), "offsets_changed": changed}


def _prove(path: Path, tok, probes: list[str], probe, reference: torch.Tensor, unrounded: torch.Tensor) -> dict:
    """transformers reads the folded file: its tokenizer and its logits against the trained model's; and the parts
    of that difference: the unrounded fold against the trained model (float arithmetic only), the file against the
    unrounded fold (the offsets' fp16 rounding only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    folded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = folded(**probe).logits.float()
    keep = probe["attention_mask"].bool()

    def diff(a, b) -> dict:
        d = (a - b).abs()[keep]
        return {"max_abs_logit_diff": d.max().item(), "mean_abs_logit_diff": d.mean().item(),
                "top1_agreement": (a.argmax(-1) == b.argmax(-1))[keep].float().mean().item()}

    return {"tokenizer_agreement": {s: tok(s, add_special_tokens=False)["input_ids"] ==
                                    file_tok(s, add_special_tokens=False)["input_ids"] for s in probes},
            "probe_tokens": int(keep.sum()), "fidelity": diff(logits, reference),
            "fidelity_parts": {"unrounded_fold_vs_trained": diff(unrounded, reference),
                               "file_vs_unrounded_fold": diff(logits, unrounded)}}
