"""AdaMix's consistency regularisation (arXiv 2205.12410, section 3.2) on the SFT loss: `adapter.method: adamix`
with `adamix.consistency_weight` w > 0.

Every forward of an AdaMix layer draws its own A and B (finetune/model/adamix.py), so two forwards of one micro
batch are two sub-networks of the mixture. The loss of the batch is the next-token cross-entropy of the first
plus w times the symmetric KL divergence between the two predicted distributions, per labelled token:

    sum_t CE(p1_t, y_t) + w * sum_t 1/2 (KL(p1_t || p2_t) + KL(p2_t || p1_t))

summed over the batch's labelled tokens like SFT's loss (the loop divides by the step's token count). Both
forwards train (gradients flow through both routes), and the KL is reported as the metric `consistency`. Only
the labelled positions' logits are formed (the head applied there), as SFT's loss does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data import IGNORE
from finetune.objectives.base import SFT, LossSum
from finetune.objectives.loss import _frozen_linear_head


class AdaMixSFT(SFT):
    metrics = ("consistency",)

    def __call__(self, model, batch: dict) -> LossSum:
        first, targets = labelled_logits(model, batch)
        second, _ = labelled_logits(model, batch)
        log_p, log_q = F.log_softmax(first, dim=-1), F.log_softmax(second, dim=-1)
        kl = 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum()  # 1/2 (KL(p||q) + KL(q||p)), summed
        ce = F.cross_entropy(first, targets, reduction="sum")
        return LossSum(ce + self.recipe.adamix.consistency_weight * kl, {"consistency": kl.detach()})


def labelled_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits at the positions whose next token is labelled, those tokens): the model's final hidden
    states taken at its output layer (which then runs on one position) and projected there only; the model's own
    logits where the head is not a plain frozen linear layer."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"]
    head = _frozen_linear_head(model)
    captured = {}

    def keep_hidden(module, args):
        captured["hidden"] = args[0]
        return (args[0][:, :1].contiguous(),)

    handle = head.register_forward_pre_hook(keep_hidden) if head is not None else None
    try:
        out = model(**inputs, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if head is None or "hidden" not in captured:
        return out.logits[:, -labels.shape[1]:-1][keep.to(out.logits.device)].float(), targets[keep].to(out.logits.device)
    hidden = captured["hidden"]
    rows = hidden[:, -labels.shape[1]:-1][keep.to(hidden.device)]
    return F.linear(rows, head.weight, head.bias).float(), targets[keep].to(hidden.device)
