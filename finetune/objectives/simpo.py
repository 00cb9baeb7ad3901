"""SimPO: Simple Preference Optimization with a reference-free reward (arXiv 2405.14734).

The implicit reward of an answer is its length-normalised log-probability, r = beta * (1/|y|) log pi(y|x) (the
mean over answer tokens), so no reference model and no reference forward; the loss of a pair asks the chosen
reward to exceed the rejected one by a target margin gamma:

    L = -(1 - eps) log sigmoid(r_c - r_r - gamma) - eps log sigmoid(-(r_c - r_r - gamma))

with eps the label smoothing (0 by default). This is TRL's CPOTrainer with loss_type simpo (gamma = beta x
simpo_gamma, its gamma/beta ratio) and cpo_alpha 0. Metrics are DPO's: rewards of each side, accuracy (r_c > r_r),
margin r_c - r_r, and the summed log-probabilities.
"""

from __future__ import annotations

import torch.nn.functional as F

from finetune.objectives.base import LossSum, Preference
from finetune.objectives.loss import sequence_logprobs
from finetune.recipe import Recipe, SimPOSection


class SimPO(Preference):
    """See the module docstring; pairs laid out as for DPO ([c0, r0, c1, r1, ...], one forward)."""

    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
               "logps/chosen", "logps/rejected")

    def __init__(self, recipe: Recipe | None = None):
        super().__init__(recipe)
        self.settings = recipe.simpo if recipe is not None else SimPOSection()

    def __call__(self, model, batch: dict) -> LossSum:
        s = self.settings
        logps, counts = sequence_logprobs(model, batch)
        rewards = s.beta * logps / counts
        chosen, rejected = rewards[0::2], rewards[1::2]
        z = chosen - rejected - s.margin
        losses = -(1 - s.label_smoothing) * F.logsigmoid(z) - s.label_smoothing * F.logsigmoid(-z)
        r_c, r_r = chosen.detach(), rejected.detach()
        metrics = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
                   "rewards/accuracy": (r_c > r_r).float().sum(), "rewards/margin": (r_c - r_r).sum(),
                   "logps/chosen": logps[0::2].detach().sum(), "logps/rejected": logps[1::2].detach().sum()}
        return LossSum(losses.sum(), metrics)
