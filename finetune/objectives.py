"""Training objectives: what the loss of one micro batch is (SFT today; the loop is written against this).

An objective takes the model and a collated micro batch and returns the batch's loss *summed*
over its units (tokens for SFT; pairs for a preference loss), plus metrics, each also summed over
units. `units(batch)` counts them from the batch alone, before any forward pass: the loop
(train.py) counts the units of the whole optimizer step on all processes first and divides every
micro batch's sum by that total before backward. So gradient accumulation and data parallelism
give exactly the mean over the step's units, whatever the batch shapes, and the NaN guard,
logging and evaluation are written once for every objective.

A new objective is one class here (or anywhere importable) and one entry in
`recipe.OBJECTIVES`, which maps the recipe's `training.objective` value to "module:Class".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from finetune.data import IGNORE
from finetune.loss import token_loss_sum
from finetune.recipe import OBJECTIVES, Recipe


@dataclass
class LossSum:
    total: torch.Tensor  # differentiable, summed over the batch's units
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, each summed over units


class Objective:
    """The interface. `metrics` names what `__call__` reports, in a fixed order (summed across processes)."""

    unit = "token"
    metrics: tuple[str, ...] = ()

    def __init__(self, recipe: Recipe | None = None):
        self.recipe = recipe

    def units(self, batch: dict) -> int:
        raise NotImplementedError

    def __call__(self, model, batch: dict) -> LossSum:
        raise NotImplementedError


class SFT(Objective):
    """Next-token cross-entropy on the labelled (response) tokens; head and softmax only there (loss.py)."""

    unit = "token"

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> LossSum:
        return LossSum(token_loss_sum(model, batch))


def make_objective(recipe: Recipe) -> Objective:
    """The recipe's objective, built from its `recipe.OBJECTIVES` entry."""
    module, name = OBJECTIVES[recipe.training.objective].split(":")
    return getattr(importlib.import_module(module), name)(recipe)
