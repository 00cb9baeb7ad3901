"""Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE): what LoRA trains on them, and the routers' load-balancing
loss.

transformers 5 holds each MoE block as a router (an experts x hidden weight; the model records its logits as
`router_logits`) and an experts module whose weights are fused 3-D parameters: gate_up_proj (experts, 2 x ff,
hidden) and down_proj (experts, hidden, ff). On disk the checkpoint keeps one 2-D tensor per expert
(transformers converts on load and back on save).

What trains:
- attention: `lora.target_modules: all-linear` resolves to the decoder layers' nn.Linear modules (q/k/v/o); PEFT's
  own all-linear would also reach the experts and the routers (its v4 -> v5 conversion), which finetune leaves
  to the two keys below;
- experts (`lora.target_experts`): PEFT's `target_parameters`, a lora.ParamWrapper per fused tensor adding
  B_e A_e (rank r per expert e) to it while the block runs; no dropout, DoRA or weight-based init there;
- routers (`lora.train_router`): trained in full (`modules_to_save`); frozen by default.

4 bit: bitsandbytes quantizes nn.Linear layers only (transformers replaces them by Linear4bit), so under QLoRA the
attention projections are NF4 while the fused expert tensors and the routers stay in the compute dtype (float32 or
bfloat16); `finetune plan` counts them so. On a real MoE the experts are most of the weights (Mixtral 8x7B: ~96%),
so QLoRA there saves little beyond attention: docs/models.md.

Load balancing: transformers computes it (each model's `load_balancing_loss_func`) only with
output_router_logits and labels; finetune's objectives compute their own loss, so `RouterLoss` records the router
logits of every training forward (hooks on the router modules, skipped while backward recomputes a checkpointed
layer) and returns coef x that loss, which the training step adds and logs as aux_loss.
"""

from __future__ import annotations

import sys

import torch

from finetune.errors import RecipeError


def routers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every router: the modules transformers records as `router_logits`."""
    kinds = set()
    for m in model.modules():
        recorder = (getattr(m, "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None:
            kinds.add(getattr(recorder, "target_class", recorder))
    return [(n, m) for n, m in model.named_modules() if kinds and isinstance(m, tuple(kinds))]


def is_moe(model) -> bool:
    return bool(routers(model))


def expert_parameters(model) -> list[str]:
    """The fused expert tensors as PEFT's target_parameters name them (`mlp.experts.gate_up_proj`, ...): the 3-D
    parameters inside the decoder layers, the layer prefix removed."""
    import re

    found = set()
    for name, p in model.named_parameters():
        m = re.search(r"\.layers\.\d+\.(.+)$", name)
        if p.dim() == 3 and m:
            found.add(m.group(1).replace(".base_layer", ""))
    return sorted(found)


def router_modules(model) -> list[str]:
    """The routers' names relative to their decoder layer (`mlp.gate`), as modules_to_save matches them."""
    import re

    return sorted({re.sub(r"^.*\.layers\.\d+\.", "", n) for n, _ in routers(model)})


def lora_targets(recipe, model, targets, modules_to_save: list[str]) -> tuple[object, list[str], list[str]]:
    """(target_modules, target_parameters, modules_to_save) for LoRA on `model`: on a dense model as the recipe
    says; on a mixture of experts (where the caller resolved all-linear to the decoder layers' linear modules),
    the experts and routers added when the recipe asks."""
    lora = recipe.lora
    if not is_moe(model):
        asked = "lora.target_experts" if lora.target_experts else "lora.train_router" if lora.train_router else None
        if asked:
            raise RecipeError(f"{asked} is a mixture-of-experts setting, and this model has no experts.")
        return targets, [], modules_to_save
    params = expert_parameters(model) if lora.target_experts else []
    if lora.target_experts and lora.dropout:
        raise RecipeError(f"lora.dropout {lora.dropout} cannot be combined with lora.target_experts true (PEFT's "
                          "expert wrapper has no input to drop out); set lora.dropout 0.")
    saved = modules_to_save + (router_modules(model) if lora.train_router else [])
    return targets, params, saved


class RouterLoss:
    """coef x the load-balancing loss of the router logits recorded during the training forwards since the last
    call (see the module docstring); nothing for a dense model or a coefficient of 0."""

    def __init__(self, model, coef: float | None):
        found = routers(model)
        config = getattr(model, "config", None)
        self.coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)
        self.active = bool(found) and self.coef > 0
        self.logits: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.losses: list[torch.Tensor] = []
        if not self.active:
            return
        self.experts = int(getattr(config, "num_local_experts", None) or config.num_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.balance = sys.modules[type(found[0][1]).__module__].load_balancing_loss_func
        for _, module in found:
            module.register_forward_hook(self._record)
        model.register_forward_pre_hook(self._start, with_kwargs=True)
        model.register_forward_hook(self._end)

    def _recording(self, module) -> bool:
        return module.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1

    def _start(self, module, args, kwargs):
        self.logits, self.mask = [], kwargs.get("attention_mask") if self._recording(module) else None

    def _record(self, module, args, output):
        if self._recording(module):
            self.logits.append(output[0])

    def _end(self, module, args, output):
        if self.logits and self._recording(module):
            mask = self.mask if self.mask is not None and self.mask.dim() == 2 else None
            self.losses.append(self.balance(tuple(self.logits), self.experts, self.top_k, mask))
        self.logits = []

    def take(self) -> torch.Tensor | None:
        """The load-balancing loss (unweighted, the mean over the forwards since the last call), or None."""
        if not self.losses:
            return None
        loss, self.losses = torch.stack(self.losses).mean(), []
        return loss


def checkpoint_names(model):
    """disk key -> (the model's parameter name, expert index, (part, parts)) for a transformers model, through
    transformers' own checkpoint conversion (the per-expert `...experts.{e}.w1.weight` of a checkpoint is expert e
    of part 0 of the fused `...mlp.experts.gate_up_proj`; `block_sparse_moe.gate.weight` is `mlp.gate.weight`).
    Keys the conversion leaves alone map to themselves with no expert or part."""
    import re

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    names = dict(model.named_parameters())

    def name(key: str) -> tuple[str, int | None, tuple[int, int] | None]:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if pattern is None:
            return target, None, None
        converter = next(c for c in converters if pattern in c.source_patterns)
        star = re.escape(pattern).replace(r"\*", r"(\d+)")
        found = re.search(star + "$", key)
        return target, int(found.group(1)) if found else None, (converter.source_patterns.index(pattern),
                                                                  len(converter.source_patterns))

    return name
