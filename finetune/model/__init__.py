"""Models: placement (compute dtype, 4-bit storage, strategy; resolved once), tokenizer and NF4 base loading, LoRA
attachment and the optimizer, the CPU dropout and per-example attention, tcmalloc for CPU training, GGUF models in,
and adapter checkpoints / models to evaluate or chat with.

Imports: errors, recipe, artifacts.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "placement": ["Placement", "cpu_has_native_bf16", "dtype_name", "resolve", "resolve_compute_dtype"],
    "adapters": [
        "adapter_labels", "adapter_recipe_quantization", "check_adapter_dir", "eval_quantization",
        "load_adapter_tokenizer", "load_adapters", "load_eval_model", "read_adapter_config", "saved_recipe"
    ],
    "allocator": ["allocator_in_use", "for_training", "maybe_reexec"],
    "gguf_in": ["as_transformers_dir", "source_note"],
    "load": [
        "attach_lora", "load_base_model", "load_tokenizer", "lora_config", "make_optimizer", "quantization_config"
    ],
    "attention": ["use_segmented_attention"],
})
