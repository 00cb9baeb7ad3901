"""The recipe: one pydantic schema for every section, and reading a YAML file into it with errors that name
file:line:key.

- schema.py: `Recipe` and its sections (data, training, dpo, orpo); objective registry
- model.py: the `model` and `quantization` sections (what to load, how the frozen base is stored)
- lora.py, grpo.py: the `lora` section with its variant checks; methods.py: `adapter.method` and the other
  PEFT methods' sections; the `grpo` and `rewards` sections
- qmethods.py: the checks of LoftQ on 4-bit bases, IEC and AdaMix (quantized.py: GGUF bases and QA-LoRA)
- preference.py: the `kto`, `simpo` and `reward` sections; which data each preference objective reads
- file.py: `load_recipe` (YAML with line numbers, key=value overrides, did-you-mean errors)
- templates.py: the built-in chat templates

Imports: errors only (the bottom layer besides artifacts).
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "templates": ["ALPACA", "MARKERS"],
    "schema": [
        "DATA_EXTENSIONS", "DPOSection", "DTYPE_ALIASES", "DataSection", "DatasetSpec", "FORMAT_FIELDS", "ModelSection",
        "OBJECTIVES", "QuantizationSection", "Recipe", "data_files"
    ],
    "lora": ["LoraSection"],
    "methods": ["MERGEABLE_METHODS", "METHODS", "VIRTUAL_TOKEN_METHODS", "check_adalora_schedule"],
    "grpo": ["RewardSpec"],
    "preference": ["KTOSection", "PAIR_OBJECTIVES", "RewardSection", "SimPOSection"],
    "file": ["load_recipe", "remote_code_warning"],
    "yamltext": ["is_text", "parse_yaml"],
})
