"""finetune: QLoRA fine-tuning of causal language models, driven by YAML recipes."""

__version__ = "0.1.0"
