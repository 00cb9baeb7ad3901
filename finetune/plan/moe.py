"""What a mixture of experts adds to the memory plan (memory.py), measured against what autograd keeps
(tests/test_families.py: `test_moe_activation_term_is_close_to_what_autograd_saves`).

- weights: the fused expert tensors and the routers are not nn.Linear, so bitsandbytes leaves them in the compute
  dtype (model/moe.py): terms.weight_bytes counts them with the embeddings and norms, at the compute dtype's width.
- activations, per token and MoE layer, in place of the dense MLP's three intermediates: for each of the top_k
  experts a token is routed to, its gathered input (hidden), the fused gate/up output (2 x ff) and the gated
  activation (ff); and the router's float32 probabilities (experts) with the chosen indices and weights.
- expert LoRA (PEFT's ParamWrapper): the expert weights with B_e A_e added are formed while the block runs and kept
  for backward (each expert's matmul saves its slice of them): one copy of the layer's expert tensors per layer
  (one layer with gradient checkpointing), and the input of each routed expert once more.
"""

from __future__ import annotations


def moe_shape(config) -> tuple[int, int, int] | None:
    """(experts, experts per token, expert width) of a mixture of experts' config; None for a dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not experts:
        return None
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return int(experts), int(config.num_experts_per_tok), int(width)


def moe_token_bytes(config, stream: int) -> int | None:
    """Bytes one MoE block keeps per token for backward (None: a dense model, whose MLP terms.py counts)."""
    shape = moe_shape(config)
    if shape is None:
        return None
    experts, top_k, width = shape
    routed = top_k * (config.hidden_size + 3 * width) * stream + top_k * 8  # + the gathered tokens' indices
    return routed + 4 * experts + 12 * top_k  # router: float32 probabilities, top-k indices and weights


def expert_lora_bytes(model, width: int) -> tuple[int, int]:
    """(bytes of one layer's expert weights with their LoRA delta, values kept per token and layer) for the
    layers whose experts carry LoRA (PEFT's ParamWrapper); (0, 0) otherwise."""
    from peft.tuners.lora.layer import ParamWrapper

    wrapped = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    if not wrapped:
        return 0, 0
    layers = {id(m.get_base_layer()) for m in wrapped}
    per_layer = sum(m.get_param().numel() for m in wrapped) * width // max(len(layers), 1)
    config = model.config.get_text_config()
    return per_layer, 3 * moe_shape(config)[1] * config.hidden_size
