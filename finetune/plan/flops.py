"""Model FLOPs of LoRA training, for model FLOPs utilisation (MFU) in the bench and the GPU report.

Counted per trained token of a Llama-style decoder with frozen base weights (PaLM's accounting, with
the weight-gradient term dropped because the base does not train):

- decoder linear layers, N non-embedding weights: 2N forward + 2N for the input gradient = 4N
  (a trained weight would need 2N more for its own gradient: 6N is full fine-tuning's figure);
- attention scores and their weighted sum: 4 L H Q T forward, times 3 with backward = 12 L H Q T,
  with L layers, H heads of width Q and T the example's length (the length attention runs over);
  PaLM's convention, without halving for the causal mask;
- the LM head, V x hidden: 4 V hidden per *labelled* token only (finetune applies it there alone,
  finetune/objectives/loss.py); a tool that scores every position does more work than the model needs, which MFU
  does not credit;
- the LoRA matrices: 6 per trainable parameter (forward, input and weight gradients), small.

Recomputation under gradient checkpointing is not counted: MFU is the model's FLOPs, not the
hardware's, so recomputing lowers it.
"""

from __future__ import annotations


def _shape(config):
    """(text config, query heads, key/value heads, head width) of a Llama-style decoder config."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return c, heads, kv, getattr(c, "head_dim", None) or c.hidden_size // heads


def decoder_weights(config) -> int:
    """N: weights of the decoder layers' linear projections (attention q k v o and the gated MLP)."""
    c, heads, kv, head_dim = _shape(config)
    attention = c.hidden_size * head_dim * (2 * heads + 2 * kv)
    return c.num_hidden_layers * (attention + 3 * c.hidden_size * c.intermediate_size)


def train_flops(config, lengths: list[int], labelled: int, lora_params: int = 0) -> float:
    """Model FLOPs of one pass of forward + backward over examples of `lengths` tokens, of which `labelled`
    carry a label (the positions the LM head runs at)."""
    c, heads, _, head_dim = _shape(config)
    tokens = sum(lengths)
    attention = 12 * c.num_hidden_layers * heads * head_dim * sum(n * n for n in lengths)
    return (4 * decoder_weights(c) * tokens + attention + 4 * c.vocab_size * c.hidden_size * labelled
            + 6 * lora_params * tokens)


def flops_per_token(config, seq_len: int, lora_params: int = 0) -> float:
    """The GPU report's 4N + 12 L H Q T (+ the head at every position, + LoRA) per token of rows of seq_len."""
    return train_flops(config, [seq_len], seq_len, lora_params) / seq_len


def lora_params(config, r: int) -> int:
    """Trainable parameters of rank-r adapters on every decoder linear layer (`all-linear`): r (in + out) each."""
    c, heads, kv, head_dim = _shape(config)
    h, i = c.hidden_size, c.intermediate_size
    per_layer = (h + heads * head_dim) * 2 + (h + kv * head_dim) * 2 + (h + i) * 3
    return c.num_hidden_layers * r * per_layer
