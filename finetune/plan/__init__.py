"""Before a run: `finetune prepare` (data tokenized, cached and summarised), `finetune plan` (peak memory term by
term, meta-device model) and the model FLOPs of LoRA training (MFU).

Imports: errors, progress, recipe, data, quant, model.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "memory": ["CACHE_TERM", "parse_size", "plan", "print_plan"],
    "data_summary": ["prepare", "print_examples", "print_summary"],
})
