"""`finetune merge`: fold LoRA adapters into their base model and save a standalone model.

A QLoRA adapter was trained against dequant(quant(W)), not W. Merging it into the
original weights gives W + delta, a model that differs (slightly) from the one
that was trained and evaluated. `base_weights="dequantized"` (the default for a
4-bit recipe) merges into dequant(quant(W)) + delta instead, which reproduces the
trained model's logits up to float rounding.

How it runs, and why:
1. Load the base exactly as trained (4-bit when the recipe was QLoRA) with the
   adapter(s), combined by PEFT's `add_weighted_adapter` when there are several.
   Its logits on a fixed probe batch are the reference: "the model that was trained".
2. Stream the base checkpoint tensor by tensor (safetensors, read with pread):
   each LoRA-targeted weight becomes base + PEFT's `get_delta_weight` (DoRA: rescaled
   row by row to its magnitude vector; merge_weights.py), in float32, and every other
   4-bit weight becomes the chosen base weights (dequantized NF4 by default), cast to
   the saved dtype and written straight into its shard, so only one tensor is in
   memory at a time. The weights of the other `base_weights`
   choice go to a scratch directory beside the output, so both can be measured.
3. Free the reference, load the merged model and compute the "merge fidelity": the
   max and mean absolute logit difference from the reference, for the chosen
   base weights and (swapping the 4-bit layers' weights in, one at a time) for the
   other. Peak memory is about the larger of the merged model and the 4-bit reference.
Everything is written to a hidden sibling of `--out` and renamed into place only
when complete (with `merge_report.json`), so a failure never leaves a partial model.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finetune.artifacts import atomic_dir
from finetune.errors import CheckpointError, ModelError, first_line
from finetune.merge.fidelity import fidelity, peak_rss_mib, probe_batch
from finetune.merge.output import _DTYPES, open_safetensors, save_companions
from finetune.merge.output import SafetensorsWriter as _SafetensorsWriter, check_hub_access as _check_hub_access
from finetune.merge.output import push as _push
from finetune.merge.weights import dequantized as _dequantized, fold as _fold, fold_bias as _fold_bias
from finetune.merge.weights import is_4bit as _is_4bit, split_residual as _split_residual
from finetune.model import saved_recipe
from finetune.progress import track
from finetune.recipe import DTYPE_ALIASES, ModelSection, QuantizationSection

COMBINATIONS = ("linear", "cat", "ties")
REPORT_FILE = "merge_report.json"


@dataclass
class MergeReport:
    out: str
    base: str
    adapters: list[str]
    weights: list[float] | None
    combination: str | None
    base_weights: str
    dtype: str
    # {"dequantized": {"max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement"}, "original": {...}}
    fidelity: dict[str, dict[str, float]]
    reference: str
    probe_tokens: int
    shards: int
    size_bytes: int
    rss_before_mib: float
    peak_rss_mib: float
    wall_time_s: float
    pushed_to: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> dict[str, float]:
        return self.fidelity[self.base_weights]

    def to_json(self) -> dict:
        return asdict(self)


def merge(
    adapters: str | Path | list[str | Path],
    out: str | Path,
    *,
    base: str | None = None,
    base_weights: str = "auto",
    dtype: str = "auto",
    weights: list[float] | None = None,
    combination: str = "linear",
    density: float = 0.5,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    push_to_hub: str | None = None,
) -> MergeReport:
    """Merge one adapter (or a weighted combination of several) into the base; see the module docstring."""
    started, rss_before = time.perf_counter(), peak_rss_mib()
    adapter_dirs = [Path(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    out = Path(out)
    model_section, quant = _check_inputs(adapter_dirs, out, base, weights, combination, overwrite, max_shard_size)
    if base_weights == "auto":
        base_weights = "dequantized" if quant.load_in_4bit else "original"
    if base_weights == "dequantized" and not quant.load_in_4bit:
        raise ModelError(
            f"--base-weights dequantized needs a 4-bit adapter; {adapter_dirs[0]} was trained without quantization, "
            "so its base weights are the original ones (use --base-weights original)."
        )
    if push_to_hub:
        _check_hub_access(push_to_hub)  # fail before minutes of merging, not after
    target_dtype = _target_dtype(dtype, model_section)
    files = base_weight_files(model_section)

    from finetune.model import load_adapter_tokenizer

    tok, tokenizer_note = load_adapter_tokenizer(adapter_dirs[0], model_section)  # as training loads it
    probe = probe_batch(tok)
    trained, adapter_name = _load_trained(model_section, quant, adapter_dirs, weights, combination, density)
    residual = _split_residual(trained, adapter_name) if _is_residual(adapter_dirs, weights) else {}
    with torch.no_grad():
        reference = trained(**probe).logits.float()
    modes = ["dequantized", "original"] if quant.load_in_4bit else ["original"]
    other = [m for m in modes if m != base_weights]
    notes = [] if quant.load_in_4bit else ["dequantized: not applicable, the adapter was trained without quantization"]
    notes += [tokenizer_note] if tokenizer_note else []
    notes += [n for n in [_gguf_note(model_section.name_or_path)] if n]

    scratch = Path(tempfile.mkdtemp(prefix=f".scratch-{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        with atomic_dir(out, kept=f"The previous contents of {out}, if any, are intact.") as tmp:
            shards, size = _write_merged(trained, adapter_name, files, tmp, scratch if other else None,
                                         base_weights, target_dtype, max_shard_size, residual)
            del trained
            gc.collect()  # PEFT models hold reference cycles: free the reference before loading the merged model
            save_companions(model_section, tok, tmp, target_dtype)
            measured = fidelity(tmp, scratch, probe, reference, base_weights, other, target_dtype)
            report = MergeReport(
                out=str(out), base=model_section.name_or_path, adapters=[str(a) for a in adapter_dirs],
                weights=weights, combination=combination if len(adapter_dirs) > 1 or weights else None,
                base_weights=base_weights, dtype=str(target_dtype).removeprefix("torch."), fidelity=measured,
                reference=_describe_reference(quant), probe_tokens=int(probe["attention_mask"].sum()),
                shards=shards, size_bytes=size, rss_before_mib=rss_before, peak_rss_mib=peak_rss_mib(),
                wall_time_s=0.0, notes=notes,
            )
            report.wall_time_s = round(time.perf_counter() - started, 2)
            (tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if push_to_hub:
        _push(out, push_to_hub)
        report.pushed_to = push_to_hub
    return report


# ------------------------------------------------------------------ inputs


def _check_inputs(adapter_dirs, out, base, weights, combination, overwrite,
                  max_shard_size="5GB") -> tuple[ModelSection, QuantizationSection]:
    """The base model section and quantization the adapters were trained with; refuse bad combinations early."""
    from finetune.model import adapter_method, check_adapter_dir, check_mergeable

    for a in adapter_dirs:
        check_adapter_dir(a)
        check_mergeable(a)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"Output directory {out} is not empty; pass --overwrite to replace it.")
    if weights is not None and len(weights) != len(adapter_dirs):
        raise ModelError(f"--weights has {len(weights)} value(s) for {len(adapter_dirs)} adapter(s); "
                         "give one per adapter.")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise ModelError(f"--weights must be finite numbers, got {', '.join(map(str, weights))}.")
    try:
        from huggingface_hub.serialization._base import parse_size_to_int

        if parse_size_to_int(max_shard_size) <= 0:
            raise ValueError("must be above 0")
    except ValueError as e:
        raise ModelError(f"--max-shard-size '{str(max_shard_size)[:40]}' is not a size: {first_line(e)} "
                         "(e.g. 5GB, 500MB).") from None
    if combination not in COMBINATIONS:
        raise ModelError(f"--combination must be one of {', '.join(COMBINATIONS)}, not '{combination}'.")
    from finetune.model import read_adapter_config

    configs = [read_adapter_config(a) for a in adapter_dirs]
    bases = {c.get("base_model_name_or_path") for c in configs}
    if base is None and len(bases) > 1:
        raise ModelError(f"The adapters were trained on different bases ({', '.join(map(str, bases))}); "
                         "they cannot be merged into one model.")
    if any(adapter_method(a) != "LORA" for a in adapter_dirs) and (len(configs) > 1 or weights is not None):
        raise ModelError("Only LoRA adapters combine (PEFT's add_weighted_adapter); merge an IA3 or AdaLoRA adapter "
                         "by itself.")
    if any(c.get("use_dora") for c in configs) and (len(configs) > 1 or weights is not None):
        raise ModelError("A DoRA adapter merges alone: its magnitude vector rescales whole rows, so a weighted "
                         "combination with other adapters has no exact merged weight. Merge it by itself.")
    recipes = [saved_recipe(a) for a in adapter_dirs]
    quants = {json.dumps(r.get("quantization", {}), sort_keys=True) for r in recipes}
    if len(quants) > 1:
        raise ModelError("The adapters were trained with different quantization settings; merge them separately.")
    quant = QuantizationSection.model_validate(recipes[0]["quantization"]) if "quantization" in recipes[0] \
        else QuantizationSection(load_in_4bit=False)
    named = base or (recipes[0].get("model") or {}).get("name_or_path") or configs[0].get("base_model_name_or_path")
    if not isinstance(named, str):
        raise ModelError(f"{adapter_dirs[0]} names no base model (no recipe.yaml, no base_model_name_or_path in its "
                         "adapter_config.json); pass --base.")
    section = ModelSection.model_validate(recipes[0]["model"]) if "model" in recipes[0] and not base \
        else ModelSection(name_or_path=named)
    if section.name_or_path.endswith(".gguf"):  # streamed from its cached safetensors conversion (gguf_in.py)
        from finetune.model import as_transformers_dir

        section = ModelSection(name_or_path=str(as_transformers_dir(section.name_or_path)))
    return section, quant


def _gguf_note(name_or_path: str) -> str | None:
    from finetune.model import source_note

    return source_note(name_or_path)


def _target_dtype(dtype: str, section: ModelSection) -> torch.dtype:
    """`auto`: the dtype the base checkpoint declares (float32 when it declares none)."""
    if dtype != "auto":
        return getattr(torch, DTYPE_ALIASES.get(dtype, dtype))
    from transformers import AutoConfig

    try:
        declared = AutoConfig.from_pretrained(section.name_or_path, revision=section.revision,
                                              trust_remote_code=section.trust_remote_code).dtype
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot read the config of the base model '{section.name_or_path}': "
                         f"{first_line(e)}") from None
    if declared is None:
        return torch.float32
    return declared if isinstance(declared, torch.dtype) else getattr(torch, str(declared).removeprefix("torch."))


def base_weight_files(section: ModelSection) -> list[Path]:
    """The base checkpoint's safetensors files (local directory, or the hub cache)."""
    root = Path(section.name_or_path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(section.name_or_path, revision=section.revision,
                                          allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"]))
        except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
            raise ModelError(f"Cannot fetch the base model '{section.name_or_path}': {first_line(e)}") from None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    raise ModelError(
        f"The base model '{section.name_or_path}' has no safetensors weights (model.safetensors or an index); "
        "merge streams safetensors only. Convert it first (load it and save_pretrained it)."
    )


# --------------------------------------------------------------- the trained model


def _load_trained(section, quant, adapter_dirs, weights, combination, density):
    """Base as trained (4-bit if QLoRA) + adapter(s) on CPU, and the name of the adapter to merge. In float32
    whatever the recipe's compute dtype: the dequantized weights folded in, and the reference logits the
    merged model is checked against, are then the exact function of 4-bit codes + float32 adapter (a bf16
    reference would measure bf16 rounding, ~0.2 in the logits, instead of the merge)."""
    from finetune.model import load_adapters, load_base_model, resolve

    quant = quant.model_copy(update={"compute_dtype": "float32"})
    model = load_adapters(load_base_model(section, quant, "cpu", resolve(quant)), [str(a) for a in adapter_dirs])
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    active = "a0"
    if len(names) > 1 or weights is not None:
        try:
            model.add_weighted_adapter(names, list(weights or [1.0] * len(names)), "combined",
                                       combination_type=combination, density=density if combination == "ties" else None)
        except ValueError as e:  # e.g. `linear` and `ties` need equal ranks
            raise ModelError(f"Cannot combine the adapters with '{combination}': {e}. "
                             "`cat` accepts any ranks.") from None
        model.set_adapter("combined")
        active = "combined"
    return model.eval(), active


def _is_residual(adapter_dirs, weights) -> bool:
    """One PiSSA/OLoRA checkpoint (converted to a plain LoRA over the published weights when saved)."""
    init = str((saved_recipe(adapter_dirs[0]).get("lora") or {}).get("init", "default"))
    return len(adapter_dirs) == 1 and weights is None and init.startswith(("pissa", "olora"))


def _describe_reference(quant: QuantizationSection) -> str:
    if not quant.load_in_4bit:
        return "base + adapter (no quantization), on CPU"
    if quant.quant_type == "gguf":
        return "base: the GGUF file's own quantized tensors + adapter, as trained, on CPU"
    dq = ", double quant" if quant.double_quant else ""
    return f"base in 4-bit {quant.quant_type}{dq} + adapter, as trained, on CPU"


# -------------------------------------------------------------------- writing


def _write_merged(trained, adapter, files, out_dir, scratch, base_weights, dtype, max_shard_size,
                  residual: dict) -> tuple[int, int]:
    """Stream the base checkpoint into `out_dir` as merged shards (and the other choice's 4-bit layer weights into
    `scratch`), one tensor in memory at a time. `residual`: s B0 A0 per PiSSA/OLoRA layer, subtracted from the
    published weight as training did. Returns (number of shards, total bytes)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    modules = dict(trained.base_model.model.named_modules())
    lora = {n: m for n, m in modules.items()  # LoRA (AdaLoRA's SVD layers are LoRA layers too) and IA3 layers
            if (isinstance(m, LoraLayer) and adapter in m.lora_A) or (isinstance(m, IA3Layer) and adapter in m.ia3_l)}
    # 4-bit layers the adapter leaves alone also ran on dequant(quant(W)) in training (e.g. lora.layers)
    frozen = {n: m for n, m in modules.items() if _is_4bit(m) and not n.endswith(".base_layer") and n not in lora}
    swapped = set(lora) | set(frozen)  # weights whose two base-weights choices differ
    trained_copies = {n: m.modules_to_save[adapter] for n, m in modules.items()
                      if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save}
    trained_bias = getattr(trained.peft_config[adapter], "bias", "none") != "none"
    handles = [open_safetensors(f) for f in files]
    where = {k: h for h in handles for k in h.keys()}
    missing = {f"{n}.weight" for n in lora} - set(where)
    if missing:
        raise ModelError(
            f"The adapter modifies weights the base checkpoint does not store under the same name "
            f"({', '.join(sorted(missing)[:3])}...): tied or renamed weights cannot be merged by streaming."
        )

    def saved_dtype(t_dtype: torch.dtype) -> torch.dtype:
        return dtype if t_dtype.is_floating_point else t_dtype

    plan = {}  # the merged model's tensors, as shapes only: enough to plan shards and write headers
    for k, h in where.items():
        sl = h.get_slice(k)
        plan[k] = torch.empty(sl.get_shape(), dtype=saved_dtype(_DTYPES[sl.get_dtype()]), device="meta")
    split = split_torch_state_dict_into_shards(plan, max_shard_size=max_shard_size)

    def merged_weights(key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the saved tensor, the other base-weights choice's version when the key is a 4-bit layer's)."""
        module_name, _, param = key.rpartition(".")
        tensor = where[key].get_tensor(key)
        if module_name in lora and param == "weight":
            layer = lora[module_name]
            dequantized, original = _dequantized(layer), tensor.float()
            chosen, other = (dequantized, original) if base_weights == "dequantized" else (original, dequantized)
            if module_name in residual:  # full precision only: no other choice
                chosen = chosen - residual[module_name]
            return _fold(layer, adapter, chosen).to(dtype), _fold(layer, adapter, other).to(dtype)
        if module_name in frozen and param == "weight":
            dequantized, original = _dequantized(frozen[module_name]), tensor.float()
            chosen, other = (dequantized, original) if base_weights == "dequantized" else (original, dequantized)
            return chosen.to(dtype), other.to(dtype)
        if module_name in lora and param == "bias" and hasattr(lora[module_name], "ia3_l"):
            tensor = _fold_bias(lora[module_name], adapter, tensor)
        elif module_name in trained_copies:
            tensor = getattr(trained_copies[module_name], param).detach()
        elif trained_bias and param == "bias" and module_name in modules:
            tensor = modules[module_name].get_parameter("bias").detach()
        return tensor.to(saved_dtype(tensor.dtype)), None

    with track("merge", total=len(plan), unit="tensors") as task:
        for filename, keys in split.filename_to_tensors.items():
            alt_keys = [k for k in keys if k.rpartition(".")[0] in swapped and k.endswith(".weight")] if scratch else []
            alt_path = scratch / filename if alt_keys else None
            with _SafetensorsWriter(out_dir / filename, {k: plan[k] for k in keys}) as out, \
                    _SafetensorsWriter(alt_path, {k: plan[k] for k in alt_keys}) as alt:
                for key in keys:
                    tensor, other = merged_weights(key)
                    out.write(key, tensor)
                    if key in alt.plan:
                        alt.write(key, other)
                    task.advance(1, bytes=tensor.numel() * tensor.element_size())
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(split.filename_to_tensors), int(split.metadata.get("total_size", 0))
