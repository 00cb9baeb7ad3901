"""What `finetune export` writes besides the weights: the hyper-parameters every family shares, RoPE and tokenizer
metadata in GGUF form (a family's own keys and tensor transforms: families.py).

Everything goes through the `gguf` package (the one llama.cpp maintains): its writer and its vocabulary readers
(`gguf.vocab.BpeVocab`, `LlamaHfVocab`, `gguf.SpecialVocab`). What this module decides is the mapping from a
transformers config to those keys:

- hyper-parameters: sizes, heads, norm epsilon (RMSNorm or LayerNorm), context, RoPE (base, scaling, the rotated
  share of each head) and, for a mixture of experts, the expert counts;
- tokenizers: byte-level BPE (`gpt2` in GGUF, with the pre-tokenizer id llama.cpp uses to split text before
  the merges) or SentencePiece-style BPE with byte fallback (`llama`), their special tokens (marked CONTROL
  so llama.cpp parses them in prompts) and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.errors import ModelError

# llama.cpp pre-tokenizer ids for the splitting rules found in tokenizer.json (see `pre_tokenizer_id`).
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"


def add_model_metadata(writer, config, name: str) -> None:
    """Hyper-parameters: sizes, heads (GQA), norms, context, RoPE (base, scaling, rotated dimensions), experts."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope = _rope_parameters(text)
    writer.add_name(name)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    if getattr(text, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(text.vocab_size)
    writer.add_rope_dimension_count(int(head_dim * float(rope.get("partial_rotary_factor", 1.0))))
    if getattr(text, "head_dim", None) or head_dim != text.hidden_size // text.num_attention_heads:
        writer.add_key_length(head_dim)  # readers that default it (transformers: Qwen3's 128) get it right
        writer.add_value_length(head_dim)
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    _add_rope_scaling(writer, rope)
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    if experts:
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(text.num_experts_per_tok))


def _rope_parameters(text) -> dict:
    """transformers 5's rope_parameters (the full-attention layers' where they differ per layer type, Gemma 3)."""
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    return dict(rope.get("full_attention", rope))


def _add_rope_scaling(writer, rope: dict) -> None:
    import gguf

    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind != "llama3":  # llama3 is written as the rope_freqs tensor (see llama3_rope_factors)
        raise ModelError(f"RoPE scaling '{kind}' cannot be exported to GGUF (supported: linear, yarn, llama3).")


def llama3_rope_factors(config) -> torch.Tensor | None:
    """Llama 3.1-style RoPE scaling as llama.cpp reads it: one divisor per frequency (`rope_freqs.weight`)."""
    rope = _rope_parameters(config.get_text_config() if hasattr(config, "get_text_config") else config)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * torch.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    # short wavelengths keep their frequency (1), long ones are divided by `factor`, the band between blends
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelen < old_ctx / high, torch.ones_like(divisor), divisor)
    divisor = torch.where(wavelen > old_ctx / low, torch.full_like(divisor, factor), divisor)
    return divisor.float()


# ------------------------------------------------------------------ tokenizer


def pre_tokenizer_id(tokenizer_json: dict, model_name: str) -> str:
    """llama.cpp's name for the text splitting the tokenizer does before BPE merges."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    regex = "".join(str((s.get("pattern") or {}).get("Regex", "")) for s in steps if s.get("type") == "Split")
    if regex.startswith(_LLAMA3_SPLIT):
        return "llama-bpe"
    if regex.startswith(_QWEN2_SPLIT):
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] or (kinds == ["ByteLevel"] and "smollm" in model_name.lower()):
        # SmolLM's tokenizer splits digits one by one; a SmolLM converted back from GGUF keeps only ByteLevel,
        # but its merges never join digits, so the two split the same way.
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    raise ModelError(f"The tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}{': ' + regex if regex else ''}) "
                     "has no known llama.cpp equivalent; supported: GPT-2 byte level, SmolLM, Llama 3, Qwen2.")


def add_tokenizer(writer, tok_dir: Path, vocab_size: int, model_name: str) -> dict:
    """Tokens, types, scores/merges, special token ids and the chat template; returns a summary for the report."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{tok_dir} has no tokenizer.json; export needs a fast (tokenizers) tokenizer.")
    data = json.loads(path.read_text(encoding="utf-8"))
    byte_fallback = bool(data["model"].get("byte_fallback"))
    try:
        vocab = LlamaHfVocab(tok_dir) if byte_fallback else BpeVocab(tok_dir)
    except (FileNotFoundError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: cannot read the vocabulary for GGUF ({e}).") from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i, t in added.items():  # specials are CONTROL (parsed in prompts, hidden in output), others USER_DEFINED
        if i < len(types):
            types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer: padding
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    if len(tokens) > vocab_size:
        raise ModelError(f"{path} has {len(tokens)} tokens but the model's embedding only {vocab_size} rows.")
    kind = "llama" if byte_fallback else "gpt2"
    writer.add_tokenizer_model(kind)
    pre = "default" if byte_fallback else pre_tokenizer_id(data, model_name)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if byte_fallback:
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(tok_dir, load_merges=not byte_fallback, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return {"model": kind, "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_token_ids": dict(special.special_token_ids), "chat_template": special.chat_template is not None}
