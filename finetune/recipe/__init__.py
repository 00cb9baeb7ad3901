"""The recipe: one pydantic schema for every section, and reading a YAML file into it with errors that name
file:line:key.

- schema.py: `Recipe` and its sections (model, quantization, data, training, dpo, orpo); objective registry
- lora.py, grpo.py: the `lora` section with its variant checks; the `grpo` and `rewards` sections
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
    "grpo": ["RewardSpec"],
    "file": ["load_recipe", "remote_code_warning"],
    "yamltext": ["parse_yaml"],
})
