"""Models: placement (compute dtype, 4-bit storage, strategy; resolved once), tokenizer and NF4 base loading, LoRA
attachment (or another PEFT method's, with its training-loop hooks: methods.py) and the optimizer, the CPU
dropout and per-example attention, tcmalloc for CPU training, GGUF models in (converted; or trained on their own
quantized tensors: gguf_base.py), adapter checkpoints / models to
evaluate or chat with, and reward models (a score head; reward.py).

Imports: errors, recipe, artifacts, quant.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "placement": [
        "DeviceFacts", "Placement", "auto_compute_dtype", "compute_like_training", "cpu_dtype_override",
        "cpu_has_native_bf16", "dtype_name",
        "resolve", "resolve_compute_dtype",
    ],
    "adapters": [
        "adapter_labels", "adapter_method", "adapter_recipe_quantization", "attach_saved_adapter", "check_adapter_dir",
        "check_mergeable",
        "eval_quantization", "load_adapter_tokenizer", "load_adapters", "load_eval_model", "read_adapter_config",
        "saved_recipe"
    ],
    "allocator": ["allocator_in_use", "for_training", "maybe_reexec"],
    "gguf_in": ["as_transformers_dir", "source_note"],
    "gguf_base": ["cache_for_inference", "cache_weights", "dequantized_bytes", "pack_gguf_base"],
    "load": [
        "attach_lora", "load_base_model", "load_tokenizer", "make_optimizer", "quantization_config"
    ],
    "methods": ["MethodRuntime", "lora_config", "peft_config"],
    "attention": ["use_segmented_attention"],
    "reward": ["check_reward_checkpoint", "load_reward_checkpoint", "score_module"],
})
