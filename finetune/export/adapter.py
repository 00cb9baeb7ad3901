"""`finetune export --adapter-only`: a PEFT LoRA checkpoint as a GGUF adapter for llama.cpp's `--lora`.

llama.cpp applies an adapter file over a base GGUF at load time: for a base tensor `blk.N.attn_q.weight` it
reads `blk.N.attn_q.weight.lora_a` (A, r x in) and `.lora_b` (B, out x r) and adds (alpha / r) * B @ A, with
alpha from `adapter.lora.alpha` and r from A's shape. So only PEFT's plain LoRA maps exactly: one rank and
alpha for every module (no rank/alpha patterns, no rsLoRA or DoRA scaling) and no embedding adapters or
fully trained modules. Llama q/k outputs are permuted as in the full export (B's rows), so the adapter
matches a base exported by `finetune export`. The adapter applies to the base's *original* weights: the
result equals a merge with `--base-weights original`, not the dequantized-NF4 default.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import ModelError


def write_adapter_gguf(adapter_dir: Path, path: Path, type: str, console=None) -> dict:
    """Write the adapter in `adapter_dir` to the GGUF adapter file `path`, one tensor in memory at a time."""
    import gguf
    from safetensors import safe_open

    from finetune.export.families import family_for
    from finetune.export.families_tensors import rows, tensor_name
    from finetune.progress import track

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    _check_plain_lora(adapter_dir, cfg)
    config = _base_config(adapter_dir, cfg)
    family = family_for(config)
    name_map = family.name_map(config.get_text_config().num_hidden_layers)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{adapter_dir} has no adapter_model.safetensors.")
    handle = safe_open(str(weights), framework="pt")
    ttype = gguf.GGMLQuantizationType.F32 if type == "f32" else gguf.GGMLQuantizationType.F16
    plan = []
    for key in handle.keys():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ModelError(f"{weights}: '{key}' is not a LoRA A/B matrix (trained modules or embedding "
                             "adapters); llama.cpp adapters hold only LoRA matrices. Export the merged model.")
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        suffix = ".lora_a" if ".lora_A." in key else ".lora_b"
        plan.append((tensor_name(name_map, module + ".weight") + suffix, key))
    writer = gguf.GGUFWriter(path, family.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    writer.add_name(adapter_dir.resolve().name)
    shapes = {key: tuple(handle.get_slice(key).get_shape()) for _, key in plan}
    for name, key in plan:
        nbytes = int(shapes[key][0] * shapes[key][1] * (4 if type == "f32" else 2))
        writer.add_tensor_info(name, shapes[key], _np_dtype(ttype), nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with track(f"writing {path.name.split('.partial-')[0].lstrip('.')}", total=len(plan), unit="tensors",
               console=console) as task:
        for name, key in plan:
            w = handle.get_tensor(key).float()
            if name.endswith(".lora_b"):  # B's rows are the weight's output rows: the family's row order
                w = rows(family, name, w, config)
            writer.write_tensor_data(gguf.quants.quantize(w.numpy(), ttype))
            task.advance()
    writer.close()
    notes = [] if type in ("f32", "f16") else [f"adapter tensors written as f16 (--type {type} is for models)"]
    notes.append("llama.cpp applies the adapter to the base's original weights: compare with "
                 "`finetune merge --base-weights original`")
    return {"architecture": family.arch_name, "tensors": len(plan), "notes": notes,
            "rank": cfg["r"], "alpha": cfg["lora_alpha"]}


def _check_plain_lora(adapter_dir: Path, cfg: dict) -> None:
    from finetune.model import check_mergeable

    check_mergeable(adapter_dir)  # prompt, prefix, P-tuning: no weights to export at all
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{adapter_dir} is a {cfg['peft_type']} adapter, and a llama.cpp adapter holds LoRA "
                         "matrices only; export the merged model instead (without --adapter-only).")
    unsupported = [k for k in ("use_dora", "use_rslora") if cfg.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "target_parameters") if cfg.get(k)]
    if unsupported:
        raise ModelError(f"{adapter_dir / 'adapter_config.json'}: {', '.join(unsupported)} cannot be expressed "
                         "as a llama.cpp LoRA adapter (one rank and alpha for every module); export the merged "
                         "model instead (without --adapter-only).")


def _base_config(adapter_dir: Path, cfg: dict):
    """The base model's transformers config (from the checkpoint's recipe.yaml, else adapter_config.json)."""
    from transformers import AutoConfig

    from finetune.errors import first_line
    from finetune.model import saved_recipe

    base = (saved_recipe(adapter_dir).get("model") or {}).get("name_or_path") or cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}: neither recipe.yaml nor adapter_config.json names the base model.")
    if str(base).endswith(".gguf"):
        from finetune.model import as_transformers_dir

        base = str(as_transformers_dir(base))
    try:
        return AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot read the config of the base model '{base}': {first_line(e)}") from None


def _np_dtype(ttype):
    import gguf
    import numpy as np

    return np.float32 if ttype == gguf.GGMLQuantizationType.F32 else np.float16
