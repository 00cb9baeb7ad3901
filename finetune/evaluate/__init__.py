"""`finetune eval`: loss, perplexity and generation metrics for base models, adapters and merged models, side by
side; `eval_objective` is the pass training's periodic eval runs too.

- measure.py: the measuring, `--json` and `--samples`
- view.py: what eval prints (samples with the end of each prompt, the table)

Imports: errors, progress, recipe, data, model, generate, objectives.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "measure": ["eval_objective", "evaluate", "write_outputs", "write_report", "write_samples"],
    "view": ["print_report", "prompt_tail"],
})
