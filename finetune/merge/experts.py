"""The merged expert weights of a mixture of experts whose adapter trains the experts (PEFT's target_parameters).

PEFT adds s B_e A_e to each fused expert tensor (lora.ParamWrapper; gate_up_proj is (experts, 2 x ff, hidden),
down_proj (experts, hidden, ff)); the checkpoint stores one 2-D tensor per expert and projection
(`...experts.{e}.w1.weight` or `...experts.{e}.gate_proj.weight`). transformers' own checkpoint conversion says
which expert and which half of the fused tensor each stored key is (model/moe.py `checkpoint_names`), so the
merge streams the checkpoint as for any model and adds to each expert's tensor its slice of PEFT's delta.
Experts are never quantized (bitsandbytes quantizes nn.Linear layers only), so the weights merged into are the
stored ones for both base-weight choices.
"""

from __future__ import annotations

import torch


class ExpertDeltas:
    def __init__(self, model, adapter: str):
        """`model`: the transformers model inside the PeftModel, with `adapter` loaded."""
        from peft.tuners.lora.layer import ParamWrapper

        from finetune.model import checkpoint_names, is_moe

        self.wrappers = {}
        for name, module in model.named_modules():
            if isinstance(module, ParamWrapper) and adapter in module.lora_A:
                self.wrappers[f"{name.replace('.base_layer', '')}.{module.parameter_name}"] = module
        self.adapter = adapter
        self.names = checkpoint_names(model) if is_moe(model) else None
        self._cached: tuple[str, torch.Tensor] | None = None  # one fused tensor's delta at a time

    def modules(self) -> set:
        return set(self.wrappers.values())

    def delta(self, key: str) -> torch.Tensor | None:
        """float32 s B_e A_e for the checkpoint tensor `key`, or None when the adapter does not change it."""
        if not self.wrappers:
            return None
        target, expert, part = self.names(key)
        if target not in self.wrappers:
            return None
        if self._cached is None or self._cached[0] != target:
            self._cached = (target, self.wrappers[target].get_delta_weight(self.adapter).detach().float())
        delta = self._cached[1]
        if expert is not None:
            delta = delta[expert]
        if part is not None and part[1] > 1:  # the fused tensor concatenates its parts along the rows (gate, up)
            rows = delta.shape[-2] // part[1]
            delta = delta[..., part[0] * rows:(part[0] + 1) * rows, :]
        return delta

    def model_name(self, key: str) -> str:
        """The model's name for a checkpoint key (e.g. Mixtral's block_sparse_moe.gate -> mlp.gate)."""
        return self.names(key)[0] if self.names else key
