"""Tiny random models of every supported family, built from transformers 5 configs the way issue 34 describes:
2 layers, hidden 64, 4 heads, 2 KV heads (GPT-NeoX and llama.cpp's OLMoE have no grouped-query attention: 4),
mixtures of experts with
4 experts and 2 per token; each saved with the tests' ChatML tokenizer."""

from pathlib import Path

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
MOE = dict(num_experts_per_tok=2, router_jitter_noise=0.0)

# family -> (config class, extra config keys); the model class is the config's causal LM
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {"pad_token_id": None}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                                  "logits_scaling": 1.5}),
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None, "rotary_pct": 0.5}),  # no GQA in either
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, **MOE}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 64, "head_dim": 16,
                                     "norm_topk_prob": True, **MOE}),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_key_value_heads": None, **MOE}),  # llama.cpp's OLMoE: no GQA
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


def build_family_model(family: str, tokenizer, path: Path, seed: int = 0) -> Path:
    """Save the tiny random `family` model with `tokenizer` in `path` (float32 safetensors)."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_name, extra = FAMILIES[family]
    keys = {"tie_word_embeddings": False, **COMMON, **extra}
    keys = {k: v for k, v in keys.items() if v is not None or k in ("sliding_window", "pad_token_id")}  # None: default
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **keys)
    if "pad_token_id" not in extra:
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so a wrong mapping or a missed offset shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "layernorm" in name else 0.0, 0.3 if "norm" in name else 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
