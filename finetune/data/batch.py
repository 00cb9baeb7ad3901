"""Batching: packing examples into rows, padding-free rows, and collation into tensors.

Padding is masked by position in the collator, never by token id, so a tokenizer whose pad
token is also its EOS token keeps its EOS labels. Packing concatenates examples into rows of
`max_length` with `position_ids` restarting at 0 for each example and no attention mask:
transformers then builds a block-diagonal causal mask from the position ids, so no example
attends to another (this only happens with `attention_mask=None` and no KV cache, i.e. the
model is called with `use_cache=False`). The first label of every packed example is -100, so
nothing is learned across a boundary. Preference pairs stay together: `Pairs` serves a pair per
item and `PairCollator` lays it out as chosen, rejected.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any

import torch

from finetune.data.render import IGNORE

# --------------------------------------------------------------------- packing


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Rows of at most max_length tokens, filled best-fit-decreasing, with position_ids restarting per example.

    Each row gets `input_ids`, `labels` (the first label of every example set to -100, so no token is
    predicted across a boundary) and `position_ids`.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        j = bisect.bisect_left(space, (n, -1))
        if j == len(space):
            rows.append([i])
            bisect.insort(space, (max_length - n, len(rows) - 1))
        else:
            free, r = space.pop(j)
            rows[r].append(i)
            bisect.insort(space, (free - n, r))
    return [_concat([examples[i] for i in row]) for row in rows]


def _concat(parts: list[dict]) -> dict:
    ids, labels, positions = [], [], []
    for ex in parts:
        ids += ex["input_ids"]
        labels += [IGNORE] + ex["labels"][1:]
        positions += range(len(ex["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def padding_efficiency(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Real tokens / tokens computed when rows of these lengths are batched at random and padded per batch."""
    if not lengths:
        return 1.0
    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(order) / sum(len(b) * max(b) for b in batches)


@dataclass
class Collator:
    """Right-pads examples into tensors; padding gets label -100.

    Plain examples get an attention mask. Packed rows (with position_ids) get none, so the model
    keeps their examples apart; their padding forms one more pseudo-sequence at the end of the row,
    and `num_tokens` says how many tokens of each row are real. With `padding_free` the batch is
    one row instead (see `flatten`).
    """

    pad_id: int
    pad_to_multiple_of: int = 1
    padding_free: bool = False

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = self._tensors(batch)
        if "reference" in batch[0]:  # GRPO's prompts carry their reference answers to the rewards (grpo.py)
            out["reference"] = [ex["reference"] for ex in batch]
        return out

    def _tensors(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return flatten(batch)
        width = max(len(ex["input_ids"]) for ex in batch)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in batch[0]
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        lengths = torch.tensor([len(ex["input_ids"]) for ex in batch])
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = int(lengths[i])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            if packed:
                positions[i, :n] = torch.tensor(ex["position_ids"])
                positions[i, n:] = torch.arange(width - n)
        if packed:
            return {"input_ids": ids, "labels": labels, "position_ids": positions, "num_tokens": lengths}
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def flatten(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The whole micro batch as one row without padding: examples (or packed rows) end to end.

    The same targets as the padded batch (each example's first label is never a target there either),
    kept apart the way packed rows are: position_ids restart per example and there is no attention mask.
    """
    ids, labels, positions = [], [], []
    for ex in batch:
        ids += ex["input_ids"]
        labels += [IGNORE] + ex["labels"][1:]
        positions += ex["position_ids"] if "position_ids" in ex else range(len(ex["input_ids"]))
    row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions),
            "num_tokens": torch.tensor([len(ids)])}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a collated batch that are not padding (what tokens/s should count)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "num_tokens" in batch:
        return int(batch["num_tokens"].sum())
    return batch["input_ids"].numel()




class Pairs(torch.utils.data.Dataset):
    """Preference pairs, one (chosen, rejected) per item, from examples that alternate them (render.py)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples) // 2

    def __getitem__(self, i: int) -> tuple[dict, dict]:
        return self.examples[2 * i], self.examples[2 * i + 1]


@dataclass
class PairCollator:
    """A micro batch of pairs as [chosen_0, rejected_0, chosen_1, ...], padded or as one padding-free row."""

    collate: Collator

    def __call__(self, batch: list[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
        examples = [ex for pair in batch for ex in pair]
        out = self.collate(examples)
        if all("ref_logp" in ex for ex in examples):  # DPO's reference, precomputed (objectives.py)
            out["ref_logps"] = torch.tensor([ex["ref_logp"] for ex in examples], dtype=torch.float32)
        return out
