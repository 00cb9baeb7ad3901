"""Reward models: a causal LM's body with a scalar score head, as `training.objective: reward` trains it.

The base is loaded as `AutoModelForSequenceClassification` with one label (`load_base_model(..., head="score")`):
the decoder plus `score`, a linear map from the last hidden state to one number, initialised to zero so every
reward starts at 0. LoRA adapts the body; PEFT's SEQ_CLS task keeps `score` trainable and saves it with the
adapter (modules_to_save), so a checkpoint is a plain PEFT adapter:

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1, pad_token_id=tok.pad_token_id)
    model = PeftModel.from_pretrained(base, "runs/reward/checkpoint-final")

gives the trained model. finetune reads the score at each sequence's last real token (objectives/reward.py);
transformers' own pooling reads it at the last token that is not the pad token, the same token whenever a
sequence does not end in the pad token (a chat template's rendering ends in the newline after end-of-turn).
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.errors import ModelError
from finetune.model.adapters import check_adapter_dir, load_adapter_tokenizer, saved_recipe
from finetune.model.load import load_base_model
from finetune.model.placement import resolve
from finetune.recipe import ModelSection, QuantizationSection


def score_module(model) -> torch.nn.Module:
    """The score head of a reward model (through a DDP wrapper and PeftModel; PEFT's wrapper of it when adapted)."""
    model = getattr(model, "module", model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        raise ModelError(f"{type(base).__name__} has no score head: not a reward model")
    return head


def check_reward_checkpoint(path: str | Path) -> tuple[ModelSection, QuantizationSection]:
    """(base model, quantization) of a reward-model checkpoint written by `finetune train` (objective reward), from
    the recipe.yaml beside it; a ModelError naming the path for anything else. Loads nothing."""
    path = Path(path)
    check_adapter_dir(path, head="score")
    recipe = saved_recipe(path) or saved_recipe(path.parent)
    if recipe.get("training", {}).get("objective") != "reward" or "model" not in recipe:
        raise ModelError(f"{path} is not a reward-model checkpoint: the recipe.yaml beside it must say "
                         "training.objective reward (train one with recipes/reward_quickstart.yaml).")
    return ModelSection.model_validate(recipe["model"]), QuantizationSection.model_validate(
        recipe.get("quantization", {}))


def load_reward_checkpoint(path: str | Path, device) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) of a reward-model checkpoint (`check_reward_checkpoint`)."""
    from peft import PeftModel

    section, quant = check_reward_checkpoint(path)
    base = load_base_model(section, quant, device, resolve(quant), head="score")
    tok, _ = load_adapter_tokenizer(path, section)
    base.config.pad_token_id = tok.pad_token_id
    return PeftModel.from_pretrained(base, str(path)).eval(), tok
