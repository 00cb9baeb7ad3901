"""The recipe's PEFT method as a peft config (`peft_config`), and what a method needs from the training loop
beyond forward and backward (`MethodRuntime`): for AdaLoRA, its rank allocator.

AdaLoRA (arXiv 2303.10512) parametrises each update as P diag(E) Q (P = lora_B, E = lora_E, Q = lora_A) and,
after each optimizer step, scores every singular triplet i by an EMA of |w * dL/dw| over its entries (times
an EMA of its uncertainty), then zeroes the E_i of the least important ones so that the total rank follows
a cubic budget from init_r x layers (until step tinit) down to target_r x layers (from step total - tfinal).
PEFT's `update_and_allocate(step)` does that, but only if called after every optimizer step, before the
gradients are cleared, with `total_step` the run's real number of steps; its importance averages and the
rank pattern are training state a checkpoint must hold for an exact resume. Its orthogonality penalty
w (||P^T P - I||_F + ||Q Q^T - I||_F) / n is added by PEFT only to a loss computed from labels inside its
forward; finetune's objectives compute their own loss, so the runtime adds it to the loss that trains.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch

from finetune.errors import RecipeError
from finetune.recipe import VIRTUAL_TOKEN_METHODS, Recipe, check_adalora_schedule

ADAPTER = "default"  # the adapter name get_peft_model gives


def peft_config(recipe: Recipe, model):
    """The peft config of `adapter.method` (also used by `finetune plan` on a meta-device model)."""
    from peft import (
        IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType,
        PromptTuningConfig, PromptTuningInit,
    )

    method = recipe.adapter.method
    if method == "lora":
        return lora_config(recipe, model)
    if method == "adalora":
        return adalora_config(recipe, recipe.training.max_steps or 10**6)
    if method == "ia3":
        s = recipe.ia3
        return IA3Config(target_modules=list(s.target_modules), feedforward_modules=list(s.feedforward_modules),
                         task_type="CAUSAL_LM")
    if method == "prompt_tuning":
        s = recipe.prompt_tuning
        text = s.init == "text"
        return PromptTuningConfig(
            num_virtual_tokens=s.num_virtual_tokens, task_type="CAUSAL_LM",
            prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=s.init_text if text else None,
            tokenizer_name_or_path=recipe.model.name_or_path if text else None,
        )
    if method == "prefix_tuning":
        s = recipe.prefix_tuning
        return PrefixTuningConfig(num_virtual_tokens=s.num_virtual_tokens, prefix_projection=s.projection,
                                  encoder_hidden_size=s.encoder_hidden_size, task_type="CAUSAL_LM")
    s = recipe.p_tuning
    return PromptEncoderConfig(
        num_virtual_tokens=s.num_virtual_tokens, encoder_hidden_size=s.encoder_hidden_size, task_type="CAUSAL_LM",
        encoder_reparameterization_type=PromptEncoderReparameterizationType[s.encoder.upper()],
    )


def adalora_config(recipe: Recipe, total_steps: int):
    """AdaLoraConfig for a run of `total_steps` optimizer steps (tinit/tfinal shares resolved to steps)."""
    from peft import AdaLoraConfig

    s = recipe.adalora
    why = check_adalora_schedule(s, total_steps)
    if why:
        raise RecipeError(f"{why}.")
    tinit, tfinal = s.schedule(total_steps)
    return AdaLoraConfig(init_r=s.init_r, target_r=s.target_r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                         target_modules=s.target_modules, tinit=tinit, tfinal=tfinal, deltaT=s.deltaT,
                         beta1=s.beta1, beta2=s.beta2, orth_reg_weight=s.orth_reg_weight, total_step=total_steps,
                         task_type="CAUSAL_LM")


class MethodRuntime:
    """The per-step hooks of a method; for every method but AdaLoRA they do nothing."""

    def __init__(self, model=None, recipe: Recipe | None = None, total_steps: int = 0):
        """`model`: the PeftModel (unwrapped). AdaLoRA's schedule is re-tied to the run's `total_steps` here."""
        method = recipe.adapter.method if recipe is not None else "lora"
        self.model = model if method == "adalora" else None
        # P-tuning and prefix tuning with projection save only their encoder's output (the virtual tokens), which
        # is all inference needs; resuming needs the encoder itself.
        self.prompt_model = model if method in VIRTUAL_TOKEN_METHODS else None
        if self.model is not None:
            config = self.model.peft_config[ADAPTER]
            fitted = adalora_config(recipe, total_steps)
            config.total_step, config.tinit, config.tfinal = fitted.total_step, fitted.tinit, fitted.tfinal

    def penalty(self) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty (PEFT's formula), to add once to each step's loss; None otherwise."""
        if self.model is None:
            return None
        weight = self.model.peft_config[ADAPTER].orth_reg_weight
        terms = [torch.linalg.matrix_norm((p @ p.T if "lora_A" in n else p.T @ p)
                                          - torch.eye(p.shape[0 if "lora_A" in n else 1], device=p.device))
                 for n, p in self.model.base_model.model.named_parameters()
                 if ("lora_A" in n or "lora_B" in n) and ADAPTER in n]
        return weight * torch.stack(terms).mean() if terms and weight else None

    def after_step(self, step: int) -> None:
        """After optimizer step number `step` (1-based), before the gradients are cleared: AdaLoRA's
        importance update and rank re-allocation."""
        if self.model is not None:
            self.model.base_model.update_and_allocate(step)

    def state_dict(self) -> dict:
        """AdaLoRA: the allocator's importance EMAs and the current rank pattern (tensors, lists, numbers)."""
        if self.prompt_model is not None:
            return {"trainable": {n: p.detach().clone() for n, p in self.prompt_model.named_parameters()
                                  if p.requires_grad}}
        if self.model is None:
            return {}
        allocator = self.model.base_model.rankallocator
        return {"ipt": dict(allocator.ipt), "exp_avg_ipt": dict(allocator.exp_avg_ipt),
                "exp_avg_unc": dict(allocator.exp_avg_unc),
                "rank_pattern": self.model.peft_config[ADAPTER].rank_pattern}

    @property
    def restores_weights(self) -> bool:
        """Whether `load_state_dict` restores the trainable weights (instead of the checkpoint's adapter file)."""
        return self.prompt_model is not None

    def load_state_dict(self, state: dict) -> None:
        """Resume: the virtual-token methods' trainable weights; AdaLoRA's allocator (after the adapter weights)."""
        if self.prompt_model is not None and state:
            with torch.no_grad():
                for n, p in self.prompt_model.named_parameters():
                    if n in state["trainable"]:
                        p.copy_(state["trainable"][n])
        if self.model is None or not state:
            return
        allocator = self.model.base_model.rankallocator
        device = next(self.model.parameters()).device
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {n: t.to(device) for n, t in state[key].items()})
        self.model.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]

    @contextlib.contextmanager
    def saving(self, final: bool):
        """While a checkpoint is written. AdaLoRA: a step checkpoint keeps every triplet (its rank pattern
        unset), because a triplet zeroed at the last re-allocation may have trained back since, and cutting it
        would save another model than the one training runs; only at the end, where the final masking zeroed
        every pruned E_i, is the adapter saved cut to its re-allocated ranks."""
        config = self.model.peft_config[ADAPTER] if self.model is not None else None
        if config is None or final:
            with warnings.catch_warnings():  # a layer pruned to rank 0 is saved as 0-sized tensors, which PEFT
                warnings.filterwarnings("ignore", message=".*have invalid shape")  # takes for unsharded ZeRO-3
                yield
            return
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            yield
        finally:
            config.rank_pattern = pattern


def lora_config(recipe: Recipe, model):
    """The recipe's adapters as a peft LoraConfig (also used by `finetune plan` on a meta-device model).

    Variants: rsLoRA scales B A by alpha / sqrt(r) (not alpha / r); DoRA adds a trained magnitude m per
    output row, W' = m * (W + s B A) / ||W + s B A||_row; `layers` maps to PEFT's layers_to_transform, and
    rank_pattern / alpha_pattern give matching modules their own r and alpha (so their own scale)."""
    from peft import LoraConfig

    lora = recipe.lora
    try:
        layers = lora.layer_indices(model.config.get_text_config().num_hidden_layers)
    except ValueError as e:
        raise RecipeError(f"{e}.") from None
    targets = lora.target_modules
    if layers is not None and targets == "all-linear":  # PEFT takes layers_to_transform only with a list
        targets = _linear_layer_names(model)
    init = {"default": True, "gaussian": "gaussian"}.get(lora.init, lora.init)
    if lora.use_qalora:
        _check_qalora_groups(model, lora.qalora_group_size, targets, layers)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=init,
        layers_to_transform=layers,
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        task_type="SEQ_CLS" if recipe.training.objective == "reward" else "CAUSAL_LM",  # SEQ_CLS trains `score`
        use_qalora=lora.use_qalora,
        qalora_group_size=lora.qalora_group_size,
    )
    from finetune.quant import wire

    return wire(config)  # QA-LoRA's layers (finetune/quant/peft_layers.py)


def _check_qalora_groups(model, n: int, targets, layers) -> None:
    """QA-LoRA pools groups of n inputs: refuse, naming the layer, a targeted layer whose input size n does not divide."""
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if targets == "all-linear":
            hit = layer is not None
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = name.rsplit(".", 1)[-1] in targets
        if hit and (layers is None or (layer is not None and int(layer.group(1)) in layers)) and m.in_features % n:
            raise RecipeError(f"lora.qalora_group_size {n} does not divide the input size {m.in_features} of {name}; "
                              "QA-LoRA pools groups of that many inputs: pick a divisor of every adapted layer's "
                              "input size (or leave that layer out of lora.target_modules).")


def _linear_layer_names(model) -> list[str]:
    """Short names of the linear layers inside the decoder layers (what `all-linear` targets there)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and re.search(r"\.layers\.\d+\.", name)}
    return sorted(names)


