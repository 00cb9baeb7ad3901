"""Adapter checkpoints and models to run, as eval, chat, merge and export read them: an adapter directory checked
before anything loads, the recipe saved beside it (its base and quantization), and the model to evaluate or talk to
(hub id, directory, GGUF file)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from finetune.errors import ModelError, first_line
from finetune.model.load import load_base_model, load_tokenizer
from finetune.model.placement import compute_like_training, resolve, resolve_compute_dtype
from finetune.recipe import ModelSection, QuantizationSection, Recipe


def check_adapter_dir(adapter_dir: str | Path, head: str = "lm") -> None:
    """Refuse, with a readable error, a path that is not a PEFT adapter directory (before any model loads): no
    adapter_config.json, a damaged file (manifest, or safetensors' own header check), a config PEFT would misread,
    a recipe.yaml beside it that is not a recipe; or an adapter of the other kind of model: `head` lm (a causal
    LM's) or score (a reward model's, model/reward.py)."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelError(f"'{adapter_dir}' is not an adapter directory: it has no adapter_config.json.")
    from finetune.artifacts import verify_adapter

    verify_adapter(adapter_dir)  # a damaged file is named here, not a safetensors traceback later
    config = read_adapter_config(adapter_dir)
    saved_recipe(Path(adapter_dir))
    scores = config.get("task_type") == "SEQ_CLS"
    if scores != (head == "score"):
        raise ModelError(f"'{adapter_dir}' is a reward model's adapter (a score head, no LM head): it scores answers "
                         "(eval with its recipe, GRPO's reward_model reward), it does not generate, merge or export."
                         if scores else f"'{adapter_dir}' is a language model's adapter, not a reward model's.")


VIRTUAL_TOKEN_TYPES = {"PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "P_TUNING": "P-tuning"}


def adapter_method(adapter_dir: str | Path) -> str:
    """The PEFT type adapter_config.json names (LORA, IA3, ADALORA, PROMPT_TUNING, ...)."""

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


# The keys whose declared types are checked: those merge, export and the LoRA layers compute with. Not the Literal-
# typed ones: PEFT's own values outgrow them (init_lora_weights "pissa_niter_16" against "pissa_niter_[number ...]").
_TYPED_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path", "use_dora", "use_rslora",
               "fan_in_fan_out", "layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save",
               "exclude_modules", "revision", "inference_mode"}


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json as PEFT will read it, checked first: PEFT builds its config class from whatever the file
    holds (r: "four" or target_modules: 5 fail much later, or not at all), so the keys in _TYPED_KEYS are validated
    against the types the config class declares (with pydantic), r and lora_alpha must be positive, and a key this PEFT does
    not know must be null: a set feature PEFT would silently drop is a different model (upgrade PEFT)."""
    import dataclasses
    import typing

    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from pydantic import TypeAdapter, ValidationError

    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())  # verify_adapter checked that it parses
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object of PEFT settings, got a JSON {type(config).__name__}.")
    kind = config.get("peft_type")
    if kind not in {t.value for t in PeftType} or kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ModelError(f"{path}: peft_type {str(kind)[:40]!r} is not a PEFT adapter type this PEFT knows.")
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[kind]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in config.items() if k not in fields and v not in (None, {}, [], False))
    if unknown:
        raise ModelError(f"{path}: {', '.join(unknown[:5])} set, which this PEFT does not know (the adapter may come "
                         "from a newer PEFT: upgrade peft); loading would silently ignore them.")
    for key in sorted(fields & set(config) & _TYPED_KEYS):
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # a type pydantic cannot build a validator for: PEFT's own checks stay
            continue
        try:
            adapter.validate_python(config[key])
        except ValidationError as e:
            raise ModelError(f"{path}: {key}: {e.errors()[0]['msg']} (got {str(config[key])[:60]!r}).") from None
    for key in ("r", "lora_alpha"):
        if key in config and not (isinstance(config[key], (int, float)) and config[key] > 0):
            raise ModelError(f"{path}: {key} must be a positive number (got {str(config[key])[:60]!r}).")
    return config


def load_adapter_tokenizer(adapter_dir: str | Path, base: ModelSection | str) -> tuple[PreTrainedTokenizerBase, str]:
    """The tokenizer saved with an adapter (chat template included), through `load_tokenizer` as in training.
    A third-party adapter saved without one gets the base model's, with a note saying so ("" otherwise)."""
    if any((Path(adapter_dir) / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
        return load_tokenizer(str(adapter_dir)), ""
    name = base if isinstance(base, str) else base.name_or_path
    return load_tokenizer(base), f"{adapter_dir} has no tokenizer files: used the base model's ({name})"


def saved_recipe(adapter_dir: Path) -> dict:
    """The recipe saved beside a checkpoint (quantization and base model it was trained with), or {}; its model and
    quantization sections are checked against the schema (ModelError naming the file otherwise)."""
    from pydantic import ValidationError

    from finetune.errors import RecipeError
    from finetune.recipe import parse_yaml

    recipe_file = Path(adapter_dir) / "recipe.yaml"
    if not recipe_file.is_file():
        return {}
    try:
        data = parse_yaml(recipe_file.read_bytes().decode("utf-8", "replace"), str(recipe_file))[1] or {}
    except RecipeError as e:
        raise ModelError(str(e)) from None
    if not isinstance(data, dict):
        raise ModelError(f"{recipe_file}: expected a recipe (a YAML mapping), got {type(data).__name__}.")
    for key, section in (("model", ModelSection), ("quantization", QuantizationSection)):
        try:
            if key in data:
                section.model_validate(data[key])
        except ValidationError as e:
            err = e.errors()[0]
            raise ModelError(f"{recipe_file}: {key}.{'.'.join(map(str, err['loc']))}: {err['msg']} "
                             f"(got {str(err.get('input'))[:60]!r}).") from None
    return data


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
        model = load_base_model(section, quant, device, resolve(quant), head=head)
        if quant.packed:  # the file's own blocks (or ICQ's): cached where memory allows
            from finetune.model.gguf_base import cache_for_inference

            cache_for_inference(model, quant.cache_dequantized)
        return model
    from transformers import AutoModelForCausalLM

    from finetune.model.gguf_in import check_gguf

    path = Path(section.name_or_path)
    check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=resolve_compute_dtype(quant.compute_dtype),
                                                     use_kernels=False)  # as load.py
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the GGUF model {path}: {first_line(e)}") from None
    return compute_like_training(model.to(device), resolve_compute_dtype(quant.compute_dtype))


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


def load_adapters(net, adapters: list[str]):
    """`net` (a base model) with each adapter loaded by PEFT as a named adapter a0, a1, ... (eval, chat, merge): the
    errors PEFT raises for an adapter that does not fit this base (target modules it lacks, tensors of other
    shapes: an adapter trained on another model) become one ModelError naming the adapter and the base."""
    base = getattr(getattr(net, "config", None), "_name_or_path", "the base model")
    for i, path in enumerate(adapters):
        try:
            net = attach_saved_adapter(net, path, f"a{i}")
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip()).rstrip(".:")
            raise ModelError(f"The adapter {path} does not fit the base model {base}: {detail[:300]}. Was it "
                             "trained on another model? Pass the base it was trained on (--base / --model).") from None
    return net



def attach_saved_adapter(net, path: str | Path, name: str):
    """`net` with the saved adapter at `path` loaded as `name` (PeftModel.from_pretrained for a plain model). Its
    config goes through finetune.quant.wire first: a QA-LoRA adapter needs its layers registered on the config
    object, which adapter_config.json cannot hold."""
    from peft import PeftConfig, PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from finetune.quant import wire

    config = wire(PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(str(path))].from_pretrained(str(path)))
    if not isinstance(net, PeftModel):
        return PeftModel.from_pretrained(net, str(path), adapter_name=name, config=config)
    if getattr(config, "use_qalora", False):  # load_adapter would read the config again, without the layers
        config.inference_mode = True
        net.add_adapter(name, config)
    net.load_adapter(str(path), adapter_name=name)
    return net
