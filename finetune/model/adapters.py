"""Adapter checkpoints and models to run, as eval, chat, merge and export read them: an adapter directory checked
before anything loads, the recipe saved beside it (its base and quantization), and the model to evaluate or talk to
(hub id, directory, GGUF file)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from transformers import PreTrainedTokenizerBase

from finetune.errors import ModelError, first_line
from finetune.model.load import load_base_model, load_tokenizer
from finetune.model.placement import resolve, resolve_compute_dtype
from finetune.recipe import ModelSection, QuantizationSection, Recipe


def check_adapter_dir(adapter_dir: str | Path, head: str = "lm") -> None:
    """Refuse, with a readable error, a path that is not a PEFT adapter directory (before any model loads), or an
    adapter of the other kind of model: `head` lm (a causal LM's) or score (a reward model's, model/reward.py)."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelError(f"'{adapter_dir}' is not an adapter directory: it has no adapter_config.json.")
    from finetune.artifacts import verify_adapter

    verify_adapter(adapter_dir)  # a damaged file is named here, not a safetensors traceback later
    scores = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    if scores != (head == "score"):
        raise ModelError(f"'{adapter_dir}' is a reward model's adapter (a score head, no LM head): it scores answers "
                         "(eval with its recipe, GRPO's reward_model reward), it does not generate, merge or export."
                         if scores else f"'{adapter_dir}' is a language model's adapter, not a reward model's.")


VIRTUAL_TOKEN_TYPES = {"PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "P_TUNING": "P-tuning"}


def adapter_method(adapter_dir: str | Path) -> str:
    """The PEFT type adapter_config.json names (LORA, IA3, ADALORA, PROMPT_TUNING, ...)."""
    import json

    return str(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("peft_type", "LORA"))


def check_mergeable(adapter_dir: str | Path) -> None:
    """Refuse a prompt, prefix or P-tuning adapter where a merged model is needed: it is extra input (virtual
    tokens prepended to every sequence, or key/value prefixes in every layer), not a change to any weight."""
    kind = VIRTUAL_TOKEN_TYPES.get(adapter_method(adapter_dir))
    if kind:
        raise ModelError(
            f"{adapter_dir} is a {kind} adapter: its virtual tokens are extra input the model reads before every "
            f"sequence, not a change to any weight, so no merged model (nor a GGUF file of one) can reproduce it. "
            f"Run it unmerged: finetune chat {adapter_dir}, or finetune eval <recipe> --adapter {adapter_dir}."
        )


def load_adapter_tokenizer(adapter_dir: str | Path, base: ModelSection | str) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer saved with an adapter (chat template included), through `load_tokenizer` as in training.
    A third-party adapter saved without one gets the base model's, with a note saying so ("" otherwise)."""
    if any((Path(adapter_dir) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return load_tokenizer(str(adapter_dir)), ""
    name = base if isinstance(base, str) else base.name_or_path
    return load_tokenizer(base), f"{adapter_dir} has no tokenizer files: used the base model's ({name})"


def saved_recipe(adapter_dir: Path) -> dict:
    """The recipe saved beside a checkpoint (quantization and base model it was trained with), or {}."""
    recipe_file = adapter_dir / "recipe.yaml"
    return (yaml.safe_load(recipe_file.read_text()) or {}) if recipe_file.is_file() else {}


def adapter_recipe_quantization(adapter_dir: str | Path) -> QuantizationSection:
    """The quantization an adapter was trained with (no recipe beside it: none)."""
    recipe = saved_recipe(Path(adapter_dir))
    if "quantization" not in recipe:
        return QuantizationSection(load_in_4bit=False)
    return QuantizationSection.model_validate(recipe["quantization"])


def load_eval_model(section: ModelSection, quant: QuantizationSection, device, head: str = "lm"):
    """A model from a hub id, a directory or a GGUF file (dequantized by transformers on load); `head` as for
    `load_base_model` (score: a reward model's)."""
    if not section.name_or_path.endswith(".gguf") or quant.load_in_4bit or head != "lm":  # via safetensors
        return load_base_model(section, quant, device, resolve(quant), head=head)
    from transformers import AutoModelForCausalLM

    path = Path(section.name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=resolve_compute_dtype(quant.compute_dtype))
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the GGUF model {path}: {first_line(e)}") from None
    return model.to(device)


def eval_quantization(quantize: str, recipe: Recipe | None, source: str, adapters: list[str]) -> QuantizationSection:
    """auto: as the adapters were trained; else the recipe's for the recipe's own model; else none."""
    recipe_quant = recipe.quantization if recipe else QuantizationSection()
    if quantize == "none" or (source.endswith(".gguf") and quantize == "auto" and not adapters):
        return recipe_quant.model_copy(update={"load_in_4bit": False})
    if quantize == "4bit":
        return recipe_quant.model_copy(update={"load_in_4bit": True})
    if adapters:
        return adapter_recipe_quantization(adapters[0])
    if recipe and source == recipe.model.name_or_path:
        return recipe_quant
    return recipe_quant.model_copy(update={"load_in_4bit": False})


def adapter_labels(adapters: list[str]) -> list[str]:
    """`adapter` for one; otherwise the shortest distinct path suffixes (run/checkpoint-final, ...)."""
    if len(adapters) == 1:
        return ["adapter"]
    parts = [Path(a).resolve().parts for a in adapters]
    for n in range(1, max(map(len, parts)) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"adapter{i}" for i in range(len(adapters))]
