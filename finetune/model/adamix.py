"""AdaMix (arXiv 2205.12410): a mixture of LoRA modules per layer, `adapter.method: adamix` (the `lora` section sets
their rank, alpha, dropout and targets; the `adamix` section their number and the consistency weight).

Each adapted layer holds M copies of LoRA's A and of its B ("experts", all starting from the same LoRA init, as the
authors' implementation deep-copies one: github.com/microsoft/AdaMix, NLG/loralib/layers.py AdamixMergedLinear).
Training routes stochastically: every forward of a layer draws one A and, independently, one B uniformly at
random (from the global torch generator, which checkpoints save: resume is exact, and gradient checkpointing
replays the same draw); an expert not drawn in a step gets no gradient and AdamW leaves it alone. Evaluation,
and every checkpoint, merge the experts by averaging their weights, A = mean_i A_i and B = mean_j B_j (the paper's
adaptation-module merging), so the model evaluated and saved is one plain LoRA: adapter_model.safetensors is
what PEFT, merge, export and serve load as they are. PEFT's own lora_A / lora_B hold that average when saved and
do not train. The consistency regularisation (adamix.consistency_weight) is the SFT objective's
(finetune/objectives/adamix.py): a second forward with other routes and the symmetric KL of the two predictions.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraVariant

from finetune.model.variants import register

EXPERTS_A, EXPERTS_B = "adamix_A", "adamix_B"  # {adapter: ParameterList}, plain dicts: see variants.register


class AdaMixVariant(LoraVariant):
    """PEFT LoRA variant: stochastic routing over the experts in training, their average otherwise."""

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        experts_a = getattr(module, EXPERTS_A)[active_adapter]
        experts_b = getattr(module, EXPERTS_B)[active_adapter]
        if module.training:
            i, j = torch.randint(len(experts_a), (2,)).tolist()
            a, b = experts_a[i], experts_b[j]
        else:
            a, b = AdaMixVariant.folded(module, active_adapter)
        x = module.lora_dropout[active_adapter](x.to(a.dtype))
        y = torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)
        return result + (y * module.scaling[active_adapter]).to(result.dtype)

    @staticmethod
    def folded(module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of the A experts, mean of the B experts): the merged module."""
        return tuple(torch.stack(list(getattr(module, name)[adapter])).mean(0) for name in (EXPERTS_A, EXPERTS_B))

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        a, b = AdaMixVariant.folded(module, active_adapter)
        return orig_weight + (module.scaling[active_adapter] * b.detach().float() @ a.detach().float()).to(
            orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = AdaMixVariant.merge_safe(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        a, b = AdaMixVariant.folded(module, active_adapter)
        return orig_weight - (module.scaling[active_adapter] * b.detach().float() @ a.detach().float()).to(
            orig_weight.dtype)


def install(model, num_adapters: int, adapter: str = "default") -> int:
    """Give every LoRA layer of `model` (a PeftModel) `num_adapters` trainable copies of its A and B (PEFT's
    initialisation, copied) and the routing variant; PEFT's lora_A / lora_B stop training. Returns the layer count."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for layer_name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        for name, source in ((EXPERTS_A, module.lora_A[adapter]), (EXPERTS_B, module.lora_B[adapter])):
            experts = register(model, layer_name, f"{name}_{adapter}", torch.nn.ParameterList(
                [torch.nn.Parameter(source.weight.detach().clone()) for _ in range(num_adapters)]))
            if not hasattr(module, name):
                setattr(module, name, {})  # a plain dict: not registered on the layer
            getattr(module, name)[adapter] = experts
            source.weight.requires_grad_(False)
        module.lora_variant[adapter] = AdaMixVariant()
        count += 1
    return count
