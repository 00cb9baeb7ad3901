"""Decoding and what is done with it: the one decoding path (lean.py: the decode step's view of a model; step.py:
its forward pass over a static KV cache; weights.py: its weights, dequantized and packed once; nf4.py: the base's
4-bit codes read by bitsandbytes' CPU kernel at one row; batch.py: its rows;
decoder.py: the loop with sampling and stop checks) used by `finetune chat`, `eval --generate`, training's
generation metrics, GRPO's rollouts and `finetune serve`; batched greedy or sampled generation and answer scoring
(decode.py), and `finetune chat` sessions.

Imports: errors, progress, recipe, data, model.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "session": ["ChatOptions", "Session", "chat", "load_session", "render_messages", "reply", "resolve_target"],
    "lean": ["LeanModel", "build_lean", "why_not_lean"],
    "weights": ["compute_dtype", "fits_in_memory", "fold_bytes"],
    "batch": ["BASE", "LeanBatch", "ModelBatch"],
    "decoder": ["Decoder", "Sequence", "forced", "lean_decoder", "lean_model", "say"],
    "decode": [
        "GenerationOptions", "NUMBER", "generate", "generate_ids", "generation_kwargs", "generation_metrics",
        "last_number", "make_extractor", "normalize_number", "score_example"
    ],
})
