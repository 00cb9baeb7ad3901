"""Datasets in, tokenized examples out, in the order the data travels:

- read.py: files, directories, globs and hub datasets -> Records (bad records with file:line; mixing)
- render.py: Records -> chat template -> token ids and labels (response-only, train_on)
- batch.py: packing, padding-free rows, pairs, collation into tensors
- cache.py: the tokenized cache and its fingerprint; `train_eval_split` is what training calls
"""

from finetune.data.batch import Collator, PairCollator, Pairs, flatten, pack, padding_efficiency, real_tokens
from finetune.data.cache import (
    CACHE_VERSION, PreparedData, cache_dir, fingerprint, prepare_data, train_eval_split,
)
from finetune.data.read import DataStats, Record, load_source, normalize, read_rows, split_records
from finetune.data.render import (
    IGNORE, configure_tokenizer, encode, prompt_and_reference, segments, to_messages, tokenize_all,
)

__all__ = [
    "CACHE_VERSION", "IGNORE", "Collator", "DataStats", "PairCollator", "Pairs", "PreparedData", "Record",
    "cache_dir", "configure_tokenizer", "encode", "fingerprint", "flatten", "load_source", "normalize", "pack",
    "padding_efficiency", "prepare_data", "prompt_and_reference", "read_rows", "real_tokens", "segments",
    "split_records", "to_messages", "tokenize_all", "train_eval_split",
]
