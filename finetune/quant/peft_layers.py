"""PEFT wiring: LoRA on a `QuantLinear`, and QA-LoRA (arXiv 2309.14717) on every kind of base layer.

LoRA: a QuantLinear is an nn.Linear, so PEFT's own dispatcher wraps it in its default LoRA `Linear` (and DoRA's
variant reads the dequantized weight through `QuantLinear.weight`); nothing to register.

QA-LoRA: PEFT 0.21 has the variant (`QALoraLinearVariant`: the adapter's input average-pooled over groups of
`qalora_group_size` along the input dimension, times in / N, before A, so A is r x in / N) but wires it only
into GPTQ layers, and it cannot merge (get_delta_weight raises). Here its forward and init are used as they
are, on float nn.Linear, bitsandbytes' Linear4bit and QuantLinear, through PEFT's custom-module hook
(`LoraConfig._register_custom_module`), and the update it computes is written out as a weight:
    delta W[o, i] = s * (in / N) / N * (B A)[o, i // N]
(PEFT's pooling is a mean times in / N, so each input of a group gets 1 / N of it), constant over each group of
N inputs. With N a multiple of a format's block size the update is one constant per block: `block_delta`,
what export folds into the blocks' offsets.

The hook lives on the config object, not in adapter_config.json: `wire(config)` is applied to every LoraConfig
that builds or loads an adapter (finetune.model does it in lora_config and load_adapters), QA-LoRA or not.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.variants import QALoraLinearVariant


class QALoraVariant(QALoraLinearVariant):
    """PEFT's QA-LoRA variant with the merge it lacks: the pooled update written as a weight."""

    @staticmethod
    def get_delta_weight(module, active_adapter: str) -> torch.Tensor:
        n = module.qalora_group_size[active_adapter]
        a = module.lora_A[active_adapter].weight
        b = module.lora_B[active_adapter].weight
        groups = a.shape[1]  # in / N
        per_group = (b.float() @ a.float()) * (module.scaling[active_adapter] * groups / n)
        return per_group.repeat_interleave(n, dim=1).to(a.dtype)

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + QALoraVariant.get_delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += QALoraVariant.get_delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - QALoraVariant.get_delta_weight(module, active_adapter).to(orig_weight.dtype)


def block_delta(layer, adapter: str, block_size: int) -> torch.Tensor:
    """The QA-LoRA update of `layer` as one float32 constant per block of `block_size` inputs (out, in // block_size);
    the group size must be a multiple of block_size."""
    n = layer.qalora_group_size[adapter]
    if n % block_size:
        raise ValueError(f"QA-LoRA groups of {n} are not whole blocks of {block_size}")
    a = layer.lora_A[adapter].weight.detach().float()
    b = layer.lora_B[adapter].weight.detach().float()
    per_group = (b @ a) * (layer.scaling[adapter] * a.shape[1] / n)
    return per_group.repeat_interleave(n // block_size, dim=1)


class _QALoRA:
    """Mixin for PEFT LoRA layers: the QA-LoRA variant when the config asks for it, and its delta weight."""

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "use_qalora", False):
            if config.use_dora:
                raise ValueError("QA-LoRA and DoRA cannot be combined")
            return QALoraVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        if isinstance(self.lora_variant.get(adapter), QALoraVariant):
            return QALoraVariant.get_delta_weight(self, adapter)
        return super().get_delta_weight(adapter)


class QALoraLinear(_QALoRA, LoraLinear):
    """PEFT's LoRA Linear (float nn.Linear, QuantLinear) with QA-LoRA."""


def _custom_layers() -> dict:
    layers = {}
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit

        class QALoraLinear4bit(_QALoRA, Linear4bit):
            """PEFT's LoRA layer for bitsandbytes 4-bit (NF4) weights, with QA-LoRA."""

        layers[bnb.nn.Linear4bit] = QALoraLinear4bit  # before nn.Linear, its base class: the first match wins
    except ImportError:  # no bitsandbytes: no NF4 bases
        pass
    layers[torch.nn.Linear] = QALoraLinear
    return layers


_LAYERS: dict | None = None


def wire(config):
    """`config` (a peft config) with the QA-LoRA-capable layers registered, for every LoRA config: they behave as
    PEFT's own layers for a plain adapter, and a layer built for one adapter must take a QA-LoRA adapter added
    later (serve and chat load several adapters onto one model; PEFT's plain layers would give A the shape r x in
    instead of r x in / N). Returned."""
    global _LAYERS
    if hasattr(config, "_register_custom_module") and getattr(config, "peft_type", None) == "LORA":
        if _LAYERS is None:
            _LAYERS = _custom_layers()
        config._register_custom_module(_LAYERS)
    return config


def is_qalora(layer, adapter: str) -> bool:
    return isinstance(getattr(layer, "lora_variant", {}).get(adapter), QALoraVariant)
