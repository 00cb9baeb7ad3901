"""`finetune train`: set-up from the recipe, then one readable loop, then the end (loop.py); checkpoints and exact
resume state (checkpoint.py), signals (interrupt.py), metrics and run records (records.py), launcher checks.

Imports: every package below it (errors, progress, recipe, artifacts, data, quant, model, generate, plan, objectives, evaluate).
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "distributed": ["launch"],
    "loop": ["train"],
})
