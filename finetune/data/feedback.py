"""Unpaired feedback for KTO: single answers marked desirable or undesirable, each with its mismatched KL pair.

KTO (arXiv 2402.01306) compares each answer's implicit reward with a reference point z0, an estimate of
KL(pi || pi_ref) over the data: the log-ratio log pi(y'|x) - log pi_ref(y'|x) averaged over *mismatched* pairs,
a prompt x with the answer y' written for another prompt. As in TRL, the pairs are fixed when the data is
built: example i's KL pair is its own prompt with the answer of example i - 1 (the first takes the last's), in
dataset order. So they do not depend on shuffling, micro batches or processes, and a step's KL estimate over its
examples' pairs is the same however the step is split (objectives/kto.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.data.batch import Collator
from finetune.data.render import IGNORE


def answer_start(ex: dict) -> int:
    """Index of an example's first labelled token: where its answer begins (everything before is the prompt)."""
    return next(i for i, t in enumerate(ex["labels"]) if t != IGNORE)


def mismatched(prompt_of: dict, answer_of: dict, max_length: int) -> dict:
    """`prompt_of`'s prompt followed by `answer_of`'s answer (and what its template puts after it), labelled on that
    answer only, cut to max_length (always keeping at least one answer token)."""
    p, a = answer_start(prompt_of), answer_start(answer_of)
    ids = prompt_of["input_ids"][:p] + answer_of["input_ids"][a:]
    labels = [IGNORE] * p + answer_of["labels"][a:]
    keep = max(min(len(ids), max_length), p + 1)
    return {"input_ids": ids[:keep], "labels": labels[:keep]}


class Feedback(torch.utils.data.Dataset):
    """Feedback examples (with `desirable`), one per item, each carrying its KL pair under `kl`."""

    def __init__(self, examples: list[dict], max_length: int):
        self.examples, self.max_length = examples, max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {**ex, "kl": mismatched(ex, self.examples[i - 1], self.max_length)}


@dataclass
class FeedbackCollator:
    """A micro batch of feedback examples: the answers collated as usual, `desirable` (bool per answer), and the
    KL pairs collated the same way under keys prefixed `kl_`; precomputed reference log-probabilities (when the
    examples carry them) as `ref_logps` and `kl_ref_logps`."""

    collate: Collator

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = self.collate(batch)
        out["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in batch])
        out.update({f"kl_{k}": v for k, v in self.collate([ex["kl"] for ex in batch]).items()})
        if all("ref_logp" in ex for ex in batch):
            out["ref_logps"] = torch.tensor([ex["ref_logp"] for ex in batch], dtype=torch.float32)
            out["kl_ref_logps"] = torch.tensor([ex["kl_ref_logp"] for ex in batch], dtype=torch.float32)
        return out


def kl_batch(batch: dict) -> dict:
    """The KL pairs of a collated feedback batch, as a batch of their own."""
    return {k[3:]: v for k, v in batch.items() if k.startswith("kl_") and k != "kl_ref_logps"}
