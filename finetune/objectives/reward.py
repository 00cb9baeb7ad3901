"""Reward models: a scalar score head on the base, trained on preference pairs with the Bradley-Terry loss.

The model is the base as `AutoModelForSequenceClassification` with one output (finetune/model/reward.py): LoRA
on the body, the `score` head (zero at the start) trained in full and saved with the adapter. The reward r(x, y)
of a rendered prompt + answer is the head's output at the sequence's last real token. Under Bradley-Terry,
P(chosen > rejected) = sigmoid(r_c - r_r), and the loss of a pair is

    L = -log sigmoid(r_c - r_r - margin)

(`reward.margin`, 0 by default: TRL's RewardTrainer loss, with a constant margin). At the start every reward is
0 and the loss is log 2 for every pair. Metrics: the mean reward of each side, `rewards/accuracy` (the share of
pairs with r_c > r_r, what eval reports for a reward model) and `rewards/margin` (r_c - r_r).

`reward_model` is also a GRPO reward (`rewards: [{function: reward_model, path: CHECKPOINT}]`): it scores
prompt + completion with such a checkpoint, in batches, without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.data import Collator, Record, segments
from finetune.model import load_reward_checkpoint, score_module
from finetune.objectives.base import LossSum, Preference


def last_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every sequence's last real token: padded rows (right padding) or one padding-free row."""
    ids = batch["input_ids"]
    if "attention_mask" in batch:
        rows = torch.arange(ids.shape[0], device=ids.device)
        return rows, batch["attention_mask"].sum(dim=1) - 1
    if ids.shape[0] != 1:
        raise ValueError("sequence scores need padded rows or one padding-free row, not packed rows")
    starts = torch.nonzero(batch["position_ids"][0] == 0).flatten()
    ends = torch.cat([starts[1:] - 1, torch.tensor([ids.shape[1] - 1], device=ids.device)])
    return torch.zeros_like(ends), ends


def sequence_scores(model, batch: dict) -> torch.Tensor:
    """The score head's output at each sequence's last real token, one float32 value per sequence (differentiable).
    The model's own forward runs; a hook keeps the head's per-position outputs."""
    captured = {}
    handle = score_module(model).register_forward_hook(lambda module, args, out: captured.__setitem__("s", out))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    rows, cols = last_positions(batch)
    return captured["s"][..., 0][rows, cols].float()


class RewardModel(Preference):
    """See the module docstring. Pairs as for DPO: [c0, r0, c1, r1, ...], one forward."""

    head = "score"
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")

    def __call__(self, model, batch: dict) -> LossSum:
        margin = self.recipe.reward.margin if self.recipe is not None else 0.0
        r = sequence_scores(model, batch)
        diff = r[0::2] - r[1::2]
        losses = -F.logsigmoid(diff - margin)
        d = diff.detach()
        metrics = {"rewards/chosen": r[0::2].detach().sum(), "rewards/rejected": r[1::2].detach().sum(),
                   "rewards/accuracy": (d > 0).float().sum(), "rewards/margin": d.sum()}
        return LossSum(losses.sum(), metrics)


# ------------------------------------------------------------------------------- as a GRPO reward

_LOADED: dict[str, tuple] = {}  # checkpoint path -> (model, tokenizer, text after an answer), loaded once


def _reward_model(path: str):
    if path not in _LOADED:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        model, tok = load_reward_checkpoint(path, device)
        _LOADED[path] = (model, tok, _after_answer(tok))
    return _LOADED[path]


def _after_answer(tok) -> str:
    """What the chat template renders after an assistant answer (e.g. '<|im_end|>\\n'): the scored sequences end
    there in training, so a completion is scored with it appended."""
    marker = "\u2063answer\u2063"
    pieces = [text for text, _ in segments(Record("answer", {"prompt": [{"role": "user", "content": "q"}],
                                                             "answer": marker}, ""), tok)]
    full = "".join(pieces)
    return full[full.index(marker) + len(marker):]


@torch.no_grad()
def reward_model(prompts, completions, references, path, batch_size=16):
    """GRPO reward: the score of `path`'s reward model for prompt + completion (+ the template's end of turn)."""
    model, tok, after = _reward_model(path)
    device = next(model.parameters()).device
    collate = Collator(tok.pad_token_id)
    out = []
    for i in range(0, len(completions), batch_size):
        examples = []
        for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size]):
            ids = tok(p, add_special_tokens=False)["input_ids"] + tok(c + after, add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": ids, "labels": ids})
        batch = {k: v.to(device) for k, v in collate(examples).items()}
        out += sequence_scores(model, batch).tolist()
    return out
