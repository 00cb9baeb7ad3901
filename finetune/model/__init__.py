"""Models: placement (compute dtype, 4-bit storage, strategy; resolved once), tokenizer and NF4 base loading, LoRA
attachment (or another PEFT method's, with its training-loop hooks: methods.py; what it trains on a mixture of
experts and the routers' load-balancing loss: moe.py; LoftQ, IEC and AdaMix: loftq.py, iec.py, adamix.py) and the
optimizer, the CPU dropout, fused LoRA forward (sibling layers over one input as one node: grouped.py), compiled
norms and per-example attention, tcmalloc for CPU training, GGUF models in (converted; or trained on their own
quantized tensors: gguf_base.py), the dequantized weight cache of any 4-bit base (weight_cache.py), adapter
checkpoints / models to evaluate or chat with, and reward models (a score head; reward.py).

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
    "gguf_in": ["as_transformers_dir", "llama_cpp_config", "source_note"],
    "gguf_base": ["cache_for_inference", "pack_gguf_base"],
    "weight_cache": ["cache_weights", "dequantized_bytes", "linear4bit_weight"],
    "load": [
        "attach_lora", "load_base_model", "load_tokenizer", "make_optimizer", "quantization_config"
    ],
    "methods": ["MethodRuntime", "install_variants", "lora_config", "peft_config"],
    "moe": ["checkpoint_names", "is_moe"],
    "loftq": ["loftq_base_dir", "loftq_initialise", "loftq_trained_base", "loftq_trained_section", "prepare_loftq_base"],
    "variants": ["folds"],
    "icq_base": ["pack_icq_base"],
    "attention": ["MATH_MAX_TOKENS", "use_segmented_attention"],
    "compile": ["use_compiled_norms"],
    "dropout": ["MASKS", "POSITIONS_MAX_P"],
    "reward": ["check_reward_checkpoint", "load_reward_checkpoint", "score_module"],
})
