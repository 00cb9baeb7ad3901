"""What the loss of a micro batch is: SFT's token loss (LM head only at labelled positions), DPO/IPO, ORPO, SimPO,
KTO, a reward model's Bradley-Terry loss, and GRPO with its rewards. An objective has `units(batch)` and `__call__(model, batch)`; see base.py.

Imports: errors, recipe, data, model, generate.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "base": ["DPO", "Objective", "SFT", "make_objective"],
    "kto": ["KTO"],
    "reward": ["sequence_scores"],
})
