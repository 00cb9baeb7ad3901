"""KTO: Kahneman-Tversky Optimization on unpaired answers marked desirable or undesirable (arXiv 2402.01306).

With the policy pi (adapter on) and the reference pi_ref (the same 4-bit model, adapter off), each answer y to a
prompt x has the log-ratio h = log pi(y|x) - log pi_ref(y|x) (summed over answer tokens) and the loss

    desirable:    lambda_D * (1 - sigmoid(beta * (h - z0)))
    undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - h)))

The reference point z0 estimates KL(pi || pi_ref): the mean of h' = log pi(y'|x) - log pi_ref(y'|x) over the
step's *mismatched* pairs (each example's prompt with another example's answer, data/feedback.py), clamped at 0
and not differentiated, as in the paper and TRL's KTOTrainer. It is computed once per optimizer step in `rollout`
(no grad, eval mode: no dropout) over all the step's micro batches on all processes, so 1 x 4 micro batches,
4 x 1 and 2 processes x 2 give the same loss. (TRL computes it per micro batch, with dropout: the same number
for one micro batch per step without dropout.) `finetune eval` estimates it per eval batch.
At the start (LoRA B = 0) pi = pi_ref, so h = z0 = 0 and the loss of every answer is lambda / 2.

The loss of a step is the mean over its answers. Metrics: the mean reward beta * h of the step's desirable and
undesirable answers (`rewards/desirable`, `rewards/undesirable`, their difference `rewards/margin`), `kl` (z0)
and the mean summed log-probabilities `logps/desirable`, `logps/undesirable`.
"""

from __future__ import annotations

import torch

from finetune.data import kl_batch
from finetune.objectives.base import LossSum, Objective, reference_logprobs
from finetune.objectives.loss import sequence_logprobs
from finetune.recipe import KTOSection, Recipe


class KTO(Objective):
    """See the module docstring. Batches come from `FeedbackCollator`; `rollout` adds the step's z0 and counts."""

    unit = "answer"
    metrics = ("rewards/desirable", "rewards/undesirable", "rewards/margin", "kl", "logps/desirable",
               "logps/undesirable")

    def __init__(self, recipe: Recipe | None = None):
        super().__init__(recipe)
        self.settings = recipe.kto if recipe is not None else KTOSection()

    def units(self, batch: dict) -> int:
        return len(batch["desirable"])

    def prepare(self, model, train_set, eval_set, collate, batch_size: int) -> None:
        """With `precompute_reference`: the reference log-probability of every answer and of its KL pair, once,
        stored on its example (the collator hands them to the batch)."""
        if not self.settings.precompute_reference:
            return
        from torch.utils.data import DataLoader

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for data in (train_set, eval_set):
            loader = DataLoader(data, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
            for start, batch in zip(range(0, len(data), batch_size), loader):
                batch = {k: v.to(device) for k, v in batch.items()}
                ref, kl_ref = reference_logprobs(model, batch), reference_logprobs(model, kl_batch(batch))
                for ex, a, b in zip(data.examples[start:], ref.tolist(), kl_ref.tolist()):
                    ex["ref_logp"], ex["kl_ref_logp"] = a, b
        model.train(was_training)

    def rollout(self, run, group: list[dict]) -> list[dict]:
        """The step's z0 (and its answer counts, for the metrics' means) over all its micro batches and processes."""
        device = run.accelerator.device
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # sum of h', pairs, desirable, undesirable
        for batch in group:
            sums += torch.stack(self._kl_terms(run.model, batch)).to(sums)
        sums = run.accelerator.reduce(sums, "sum")
        kl = (sums[0] / sums[1].clamp(min=1)).clamp(min=0).float()
        return [{**b, "kl": kl, "counts": sums[1:].float()} for b in group]

    @torch.no_grad()
    def _kl_terms(self, model, batch: dict) -> tuple[torch.Tensor, ...]:
        """(sum of h' over the batch's KL pairs, their number, desirable answers, undesirable answers)."""
        pairs = kl_batch(batch)
        was_training = model.training
        model.eval()
        policy = sequence_logprobs(model, pairs)[0]
        model.train(was_training)
        ref = batch["kl_ref_logps"].to(policy) if "kl_ref_logps" in batch else reference_logprobs(model, pairs)
        d = batch["desirable"].to(policy.device)
        return ((policy - ref).double().sum(), torch.tensor(float(len(d)), dtype=torch.float64, device=policy.device),
                d.sum().double(), (~d).sum().double())

    def __call__(self, model, batch: dict) -> LossSum:
        s = self.settings
        logps = sequence_logprobs(model, batch)[0]
        ref = batch["ref_logps"].to(logps) if "ref_logps" in batch else reference_logprobs(model, batch)
        if "kl" in batch:  # training: the step's z0 and counts (rollout)
            kl, (n, n_d, n_u) = batch["kl"].to(logps), batch["counts"].tolist()
        else:  # eval: this batch's
            total, n, n_d, n_u = (float(x) for x in self._kl_terms(model, batch))
            kl = torch.tensor(max(total / max(n, 1), 0.0), dtype=logps.dtype, device=logps.device)
        d = batch["desirable"].to(logps.device)
        h = logps - ref
        losses = torch.where(d, s.desirable_weight * (1 - torch.sigmoid(s.beta * (h - kl))),
                             s.undesirable_weight * (1 - torch.sigmoid(s.beta * (kl - h))))
        # Metrics are summed per answer and divided by the step's answers in the loop: a class mean is its sum
        # times (answers / answers of that class); z0 is emitted times this batch's answers.
        rewards, lp, scale_d, scale_u = s.beta * h.detach(), logps.detach(), n / max(n_d, 1), n / max(n_u, 1)
        r_d, r_u = rewards[d].sum() * scale_d, rewards[~d].sum() * scale_u
        metrics = {"rewards/desirable": r_d, "rewards/undesirable": r_u, "rewards/margin": r_d - r_u,
                   "kl": kl.detach() * len(d), "logps/desirable": lp[d].sum() * scale_d,
                   "logps/undesirable": lp[~d].sum() * scale_u}
        return LossSum(losses.sum(), metrics)
