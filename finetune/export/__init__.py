"""`finetune export`: one GGUF file for llama.cpp / Ollama (gguf.py, streamed; its logit proof: readback.py), one
table entry per model family (families.py: architecture, tensor transforms, metadata; the transforms and their
inverses: families_tensors.py), the shared hyper-parameter and tokenizer metadata (metadata.py), and LoRA-only
GGUF adapters (adapter.py).

Imports: errors, recipe, artifacts, quant, model, merge.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "gguf": ["export", "print_export_report"],
    "families": ["FAMILIES", "Family", "check_architecture", "family_for", "family_of", "supported"],
    "families_tensors": ["rope_permute", "rows", "tensor_name"],
})
