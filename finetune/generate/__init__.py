"""Decoding and what is done with it: batched greedy or sampled generation and answer scoring (eval, training,
GRPO), and `finetune chat` sessions.

Imports: errors, progress, recipe, data, model.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "session": ["ChatOptions", "chat", "render_messages", "resolve_target"],
    "decode": [
        "GenerationOptions", "NUMBER", "generate", "generate_ids", "generation_kwargs", "generation_metrics",
        "last_number", "make_extractor", "normalize_number", "score_example"
    ],
})
