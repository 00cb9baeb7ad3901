"""Datasets in, tokenized examples out, in the order the data travels:

- files.py: one local file -> (file:line, row) pairs; unparsable rows are BadRecords, never exceptions
- read.py: files, directories, globs and hub datasets -> Records (bad records with file:line; mixing); hub.py the hub
  probe (offline?, the revision a dataset resolves to)
- render.py: Records -> chat template -> token ids and labels (response-only, train_on)
- batch.py: packing, padding-free rows, pairs, collation into tensors
- feedback.py: unpaired feedback (KTO): answers marked good or bad, each with its mismatched KL pair
- cache.py: the tokenized cache and its fingerprint; `train_eval_split` is what training calls

Imports: errors, recipe.
"""

from finetune import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "batch": ["Collator", "PairCollator", "Pairs", "flatten", "pack", "padding_efficiency", "real_tokens"],
    "feedback": ["Feedback", "FeedbackCollator", "kl_batch"],
    "cache": ["CACHE_VERSION", "PreparedData", "cache_dir", "fingerprint", "prepare_data", "train_eval_split"],
    "read": ["DataStats", "Record", "load_source", "normalize", "read_rows", "split_records"],
    "render": [
        "IGNORE", "configure_tokenizer", "encode", "prompt_and_reference", "segments", "to_messages", "tokenize_all"
    ],
})
