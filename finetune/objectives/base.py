"""Training objectives: what the loss of one micro batch is (SFT today; the loop is written against this).

An objective takes the model and a collated micro batch and returns the batch's loss *summed*
over its units (tokens for SFT; pairs for a preference loss), plus metrics, each also summed over
units. `units(batch)` counts them from the batch alone, before any forward pass: the loop
(train.py) counts the units of the whole optimizer step on all processes first and divides every
micro batch's sum by that total before backward. So gradient accumulation and data parallelism
give exactly the mean over the step's units, whatever the batch shapes, and the NaN guard,
logging and evaluation are written once for every objective.

An objective may also rewrite a step's micro batches before they are counted (`rollout`): GRPO turns
prompts into sampled, scored answers there (grpo.py).

A new objective is one class here (or anywhere importable) and one entry in
`recipe.OBJECTIVES`, which maps the recipe's `training.objective` value to "module:Class".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from finetune.data import IGNORE
from finetune.objectives.loss import num_sequences, sequence_logprobs, token_loss_sum
from finetune.recipe import OBJECTIVES, DPOSection, Recipe


@dataclass
class LossSum:
    total: torch.Tensor  # differentiable, summed over the batch's units
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, each summed over units


class Objective:
    """The interface. `metrics` names what `__call__` reports, in a fixed order (summed across processes)."""

    unit = "token"
    metrics: tuple[str, ...] = ()
    head = "lm"  # the model it trains: lm (a causal LM) or score (a scalar score head: reward.py)

    def __init__(self, recipe: Recipe | None = None):
        self.recipe = recipe

    def units(self, batch: dict) -> int:
        raise NotImplementedError

    def prepare(self, model, train_set, eval_set, collate, batch_size: int) -> None:
        """Once, before training, with the model as built (adapters at their initial values): a hook for
        work over the whole data set. Nothing by default."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold for an exact resume beyond model, optimizer and RNG (tensors, numbers and
        containers only: loaded with weights_only). Nothing by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` when resuming."""

    def rollout(self, run, group: list[dict]) -> list[dict]:
        """Each step, before its units are counted: the step's micro batches -> the micro batches to train on
        (any number). Unchanged by default; GRPO samples and scores answers to the prompts here (grpo.py).
        `run` is train.py's Run (model, tokenizer, accelerator, state.step = steps done)."""
        return group

    def __call__(self, model, batch: dict) -> LossSum:
        raise NotImplementedError


class SFT(Objective):
    """Next-token cross-entropy on the labelled (response) tokens; head and softmax only there (loss.py)."""

    unit = "token"

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> LossSum:
        return LossSum(token_loss_sum(model, batch))


class Preference(Objective):
    """Objectives on (prompt, chosen, rejected) pairs. A batch holds each pair's two sequences side by side,
    chosen first ([c0, r0, c1, r1, ...]: padded rows or one padding-free row), so one forward scores both;
    sequence log-probabilities are summed over answer tokens only, the head applied only there (loss.py)."""

    unit = "pair"

    def units(self, batch: dict) -> int:
        return num_sequences(batch) // 2


class DPO(Preference):
    """Direct Preference Optimization (arXiv 2305.18290), with the 4-bit base as the free reference model.

    With policy log-probabilities p and reference log-probabilities q of the chosen (c) and rejected (r)
    answers, the implicit rewards are beta * (p - q) and the loss of a pair is
        sigmoid: -(1 - eps) * log sigmoid(beta * m) - eps * log sigmoid(-beta * m),   m = (p_c - p_r) - (q_c - q_r)
        ipo:     (m - 1 / (2 * beta))^2, with p and q the mean log-probability per answer token
    where eps is `label_smoothing` (conservative DPO). The reference is the same model with its adapter
    switched off (one no-grad forward per micro batch), or `ref_logps` precomputed into the batch.
    At the start (LoRA B = 0) policy and reference agree: m = 0 and the sigmoid loss is log 2 for every pair.
    """

    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
               "logps/chosen", "logps/rejected")

    def __init__(self, recipe: Recipe | None = None):
        super().__init__(recipe)
        self.settings = recipe.dpo if recipe is not None else DPOSection()

    def prepare(self, model, train_set, eval_set, collate, batch_size: int) -> None:
        """With `precompute_reference`: every answer's reference log-probability, once, stored on its example
        (the collator hands them to the batch), so training needs no reference forward."""
        if not self.settings.precompute_reference:
            return
        from torch.utils.data import DataLoader

        was_training = model.training
        model.eval()
        for data in (train_set, eval_set):
            examples = [ex for pair in data for ex in pair]
            for batch, start in zip(DataLoader(data, batch_size=batch_size, collate_fn=collate,
                                               generator=torch.Generator()),  # leaves the global RNG alone
                                    range(0, len(examples), 2 * batch_size)):
                batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
                for ex, logp in zip(examples[start:], reference_logprobs(model, batch).tolist()):
                    ex["ref_logp"] = logp
        model.train(was_training)

    def __call__(self, model, batch: dict) -> LossSum:
        s = self.settings
        logps, counts = sequence_logprobs(model, batch)
        ref = batch["ref_logps"].to(logps) if "ref_logps" in batch else reference_logprobs(model, batch)
        if s.loss == "ipo":
            logps, ref = logps / counts, ref / counts
        chosen, rejected = logps[0::2] - ref[0::2], logps[1::2] - ref[1::2]
        margin = chosen - rejected
        if s.loss == "ipo":
            losses = (margin - 1 / (2 * s.beta)) ** 2
        else:
            losses = -(1 - s.label_smoothing) * F.logsigmoid(s.beta * margin) \
                - s.label_smoothing * F.logsigmoid(-s.beta * margin)
        r_c, r_r = s.beta * chosen.detach(), s.beta * rejected.detach()
        metrics = {"rewards/chosen": r_c.sum(), "rewards/rejected": r_r.sum(),
                   "rewards/accuracy": (r_c > r_r).float().sum(), "rewards/margin": (r_c - r_r).sum(),
                   "logps/chosen": logps[0::2].detach().sum(), "logps/rejected": logps[1::2].detach().sum()}
        return LossSum(losses.sum(), metrics)


class ORPO(Preference):
    """Odds Ratio Preference Optimization (arXiv 2403.07691): no reference model.

    With P = exp(mean log-probability per answer token), odds = P / (1 - P), the loss of a pair is
        -log P_c (the chosen answer's SFT term, per token) - lambda * log sigmoid(log odds_c - log odds_r)
    """

    metrics = ("nll", "log_odds_ratio", "rewards/accuracy", "logps/chosen", "logps/rejected")

    def __call__(self, model, batch: dict) -> LossSum:
        weight = self.recipe.orpo.lambda_ if self.recipe is not None else 0.1
        logps, counts = sequence_logprobs(model, batch)
        mean = (logps / counts).clamp(max=-1e-6)  # P < 1, so that log(1 - P) is finite
        log_odds = mean - torch.log(-torch.expm1(mean))
        ratio = log_odds[0::2] - log_odds[1::2]
        nll = -mean[0::2]
        losses = nll - weight * F.logsigmoid(ratio)
        metrics = {"nll": nll.detach().sum(), "log_odds_ratio": ratio.detach().sum(),
                   "rewards/accuracy": (ratio > 0).float().detach().sum(),
                   "logps/chosen": logps[0::2].detach().sum(), "logps/rejected": logps[1::2].detach().sum()}
        return LossSum(losses.sum(), metrics)


@torch.no_grad()
def reference_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed answer log-probabilities under the base model: the same forward with the adapter switched off (a model
    without adapters, e.g. `finetune eval --model`, is its own reference)."""
    peft_model = getattr(model, "module", model)  # through a DDP wrapper; the forward still goes through it
    if not hasattr(peft_model, "disable_adapter"):
        return sequence_logprobs(model, batch)[0]
    with peft_model.disable_adapter():
        return sequence_logprobs(model, batch)[0]


def make_objective(recipe: Recipe) -> Objective:
    """The recipe's objective, built from its `recipe.OBJECTIVES` entry."""
    if recipe.adapter.method == "adamix" and recipe.adamix.consistency_weight and recipe.training.objective == "sft":
        module, name = "finetune.objectives.adamix", "AdaMixSFT"  # SFT plus AdaMix's consistency term
    else:
        module, name = OBJECTIVES[recipe.training.objective].split(":")
    return getattr(importlib.import_module(module), name)(recipe)
