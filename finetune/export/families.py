"""One table entry per model family: what `finetune export` must know about an architecture to write the GGUF file
llama.cpp reads for it. `write_gguf` (gguf.py) asks this table and knows no architecture itself.

A `Family` holds: the gguf package's MODEL_ARCH (whose TensorNameMap renames every transformers tensor), the
transformers architecture names it covers, the row transforms llama.cpp's graph expects (families_tensors.py:
the Llama q/k RoPE permutation, GPT-NeoX's per-head fused qkv reordered to [q; k; v], Gemma's +1 on RMSNorm
weights), the family's metadata additions and the configurations llama.cpp would compute differently (refused
by name). Tensor layouts every family shares are done once in families_tensors.py: per-expert weights stacked
into one (experts, rows, cols) tensor as llama.cpp's `*_exps` tensors, an on-disk fused `gate_up_proj` split.

The layouts were learned from llama.cpp's convert_hf_to_gguf.py (conversion/*.py) and its model graphs
(src/models/*.cpp); the code is this project's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from finetune.errors import ModelError


def _none(writer, config) -> None:
    return None


def _fine(config) -> list[str]:
    return []


@dataclass(frozen=True)
class Family:
    name: str  # shown in errors and docs/models.md
    arch: str  # gguf.MODEL_ARCH member
    architectures: tuple[str, ...]  # transformers *ForCausalLM class names
    rope_permute: bool = False  # llama.cpp's NORM rope: q/k rows permuted from transformers' rotate-half layout
    neox_qkv: bool = False  # GPT-NeoX stores qkv rows per head [q_h k_h v_h]; llama.cpp reads [all q; all k; all v]
    norm_offset: float = 0.0  # Gemma's RMSNorm computes x * (1 + w): llama.cpp's x * w needs w + 1
    tied_only: bool = False  # the gguf tensor table has no separate output.weight (Gemma 2)
    readback: bool = True  # transformers reads this architecture's GGUF back (the export's logit proof)
    metadata: Callable = _none  # writer, config -> None: the family's keys beyond the common ones
    check: Callable = _fine  # config -> [reasons llama.cpp would compute another model]
    moe: bool = False

    @property
    def gguf_arch(self):
        import gguf

        return gguf.MODEL_ARCH[self.arch]

    @property
    def arch_name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def name_map(self, n_layers: int):
        """The gguf package's TensorNameMap for this architecture (transformers tensor name -> GGUF name)."""
        import gguf

        return gguf.get_tensor_name_map(self.gguf_arch, n_layers)


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ------------------------------------------------------------------ family metadata and checks


def _gemma_checks(config, big_layers: int) -> list[str]:
    """llama.cpp scales Gemma's attention by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B (recognised by
    its layer count): transformers uses query_pre_attn_scalar, so the two must agree."""
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == big_layers \
        else _head_dim(config)
    scalar = getattr(config, "query_pre_attn_scalar", expected)
    if scalar != expected:
        return [f"query_pre_attn_scalar {scalar} (llama.cpp's Gemma graph scales attention by 1/sqrt({expected}))"]
    return []


def _swa_pattern(writer, config) -> None:
    """Which layers attend through a sliding window, as transformers' layer_types says (llama.cpp reads the array)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if window:
        writer.add_sliding_window(int(window))
    if types and window:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _gemma2_metadata(writer, config) -> None:
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    _swa_pattern(writer, config)


def _gemma3_metadata(writer, config) -> None:
    _gemma2_metadata(writer, config)
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if local.get("rope_theta"):
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))


def _gemma3_checks(config) -> list[str]:
    return _gemma_checks(config, 62) + (["attn_logit_softcapping (Gemma 3's llama.cpp graph has none)"]
                                        if getattr(config, "attn_logit_softcapping", None) else [])


def _phi3_metadata(writer, config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    original = getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")
    writer.add_rope_scaling_orig_ctx_len(int(original or config.max_position_embeddings))
    writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))


def _phi3_checks(config) -> list[str]:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    return [f"RoPE scaling '{kind}' (long-context Phi-3 variants)"] if kind not in (None, "default") else []


def _granite_metadata(writer, config) -> None:
    """Granite's four multipliers, which llama.cpp's granite graph applies (attention, embeddings, residuals,
    logits divided by logits_scaling)."""
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))


def _neox_metadata(writer, config) -> None:
    writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))


def _no_gqa(config, graph: str) -> list[str]:
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    return [f"{kv} key/value heads for {heads} query heads (llama.cpp's {graph} graph has no grouped-query "
            "attention)"] if kv not in (None, heads) else []


def _olmo2_checks(config) -> list[str]:
    return ["sliding-window layers (OLMo 3)"] if getattr(config, "sliding_window", None) else []


def _moe_metadata(writer, config) -> None:
    size = getattr(config, "moe_intermediate_size", None)
    if size:
        writer.add_expert_feed_forward_length(int(size))


def _routing_checks(config, normalised: bool) -> list[str]:
    """llama.cpp's Qwen3-MoE graph renormalises the top-k routing weights, OLMoE's does not, whatever the config."""
    reasons = []
    if bool(getattr(config, "norm_topk_prob", normalised)) != normalised:
        reasons.append(f"norm_topk_prob {not normalised} (llama.cpp's graph always uses {normalised})")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        reasons.append("dense (non-expert) layers between the expert layers")
    if getattr(config, "clip_qkv", None):
        reasons.append(f"clip_qkv {config.clip_qkv}")
    return reasons


FAMILIES: tuple[Family, ...] = (
    Family("Llama", "LLAMA", ("LlamaForCausalLM",), rope_permute=True),
    Family("Mistral", "LLAMA", ("MistralForCausalLM",), rope_permute=True),
    Family("Qwen2", "QWEN2", ("Qwen2ForCausalLM",)),
    Family("Qwen3", "QWEN3", ("Qwen3ForCausalLM",)),
    Family("Gemma 2", "GEMMA2", ("Gemma2ForCausalLM",), norm_offset=1.0, tied_only=True, metadata=_gemma2_metadata,
           check=lambda c: _gemma_checks(c, 46)),
    Family("Gemma 3 (text)", "GEMMA3", ("Gemma3ForCausalLM",), norm_offset=1.0, metadata=_gemma3_metadata,
           check=_gemma3_checks),
    Family("Phi-3", "PHI3", ("Phi3ForCausalLM",), metadata=_phi3_metadata, check=_phi3_checks),
    Family("OLMo 2", "OLMO2", ("Olmo2ForCausalLM",), readback=False, check=_olmo2_checks),
    Family("Granite", "GRANITE", ("GraniteForCausalLM",), rope_permute=True, readback=False,
           metadata=_granite_metadata),
    Family("GPT-NeoX", "GPTNEOX", ("GPTNeoXForCausalLM",), neox_qkv=True, readback=False, metadata=_neox_metadata,
           check=lambda c: _no_gqa(c, "GPT-NeoX")),
    Family("Mixtral", "LLAMA", ("MixtralForCausalLM",), rope_permute=True, readback=False, moe=True),
    Family("Qwen3-MoE", "QWEN3MOE", ("Qwen3MoeForCausalLM",), metadata=_moe_metadata, moe=True,
           check=lambda c: _routing_checks(c, True)),
    Family("OLMoE", "OLMOE", ("OlmoeForCausalLM",), readback=False, moe=True,
           check=lambda c: _routing_checks(c, False) + _no_gqa(c, "OLMoE")),  # its q/k norms span the whole width
)
ARCHITECTURES = {a: f for f in FAMILIES for a in f.architectures}


def supported() -> str:
    """'LlamaForCausalLM (Llama), ...': every architecture the table covers, for error messages."""
    return ", ".join(f"{a} ({f.name})" for a, f in ARCHITECTURES.items())


def family_of(architectures: list[str] | tuple[str, ...], model_type: str = "?") -> Family:
    """The table entry for a config's `architectures`; ModelError naming every supported one otherwise."""
    for name in architectures or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ModelError(f"The architecture {', '.join(architectures or []) or model_type} is not supported: finetune "
                     f"trains, merges and exports {supported()}.")


def family_for(config) -> Family:
    """The family of a transformers config, after refusing the settings its llama.cpp graph would not reproduce."""
    family = family_of(list(getattr(config, "architectures", None) or []), getattr(config, "model_type", "?"))
    text = _text(config)
    reasons = family.check(text)
    if family.tied_only and not getattr(text, "tie_word_embeddings", True):
        reasons.append("an output layer separate from the embeddings (llama.cpp's graph reuses the embeddings)")
    if reasons:
        raise ModelError(f"Cannot export this {family.name} model to GGUF: llama.cpp would compute another model "
                         f"from it, because of {'; '.join(reasons)}.")
    return family


def read_config(model_dir):
    """The transformers config of a model directory; ModelError naming it otherwise."""
    from transformers import AutoConfig

    from finetune.errors import first_line

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot read the config of '{model_dir}': {first_line(e)}") from None


def family_metadata(writer, config, family: Family) -> None:
    """The family's additions to the common metadata (metadata.add_model_metadata)."""
    family.metadata(writer, _text(config))



def check_architecture(name_or_path: str) -> None:
    """`finetune validate` and `train`: a local model directory whose architecture the table lacks is refused,
    naming every supported one (a hub id or a GGUF file is checked when it loads: model/gguf_in.py)."""
    import json
    from pathlib import Path

    path = Path(name_or_path).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(config, dict):
        family_of(list(config.get("architectures") or []), str(config.get("model_type", "?")))
