"""`finetune export`: one GGUF file for llama.cpp / Ollama (gguf.py, streamed, with its logit proof), the
architecture and tokenizer metadata (metadata.py), and LoRA-only GGUF adapters (adapter.py).

Imports: errors, recipe, artifacts, quant, model, merge.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "gguf": ["export", "print_export_report"],
})
