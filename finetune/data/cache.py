"""The tokenized-data cache, keyed by a fingerprint of the data files, the data section and the tokenizer.

`prepare_data` reads a cache entry when the fingerprint matches, else reads, renders and
tokenizes (read.py, render.py) and writes the entry atomically; `train_eval_split` is what
training calls: tokenized (and packed, or paired) train and eval sets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.data.batch import Pairs, pack
from finetune.data.feedback import Feedback
from finetune.data.read import DataStats, _hub_offline, _hub_revision, split_records
from finetune.data.render import configure_tokenizer, tokenize_all
from finetune.recipe import DataSection, data_files

CACHE_VERSION = 1  # bump when tokenization changes, so older caches are not reused


# ----------------------------------------------------------- caching, entry


def fingerprint(data: DataSection, tok, seed: int | None = None) -> str:
    """Hash of what determines the tokenized data: file contents, the data section, the tokenizer (and seed)."""
    h = hashlib.sha256(f"v{CACHE_VERSION} seed={seed} ".encode() + data.model_dump_json().encode())
    for spec in data.train_datasets + data.eval_datasets:
        files = data_files(spec.path)
        if files is None:
            h.update(f"hub:{spec.model_dump_json()}:".encode())
            h.update(b"offline" if _hub_offline() else _hub_revision(spec.path, spec.revision).encode())
            continue
        for f in files:
            h.update(f"{f}:".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    backend = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else ""
    probe = tok("Fingerprint: 12 + 30 = 42, {\"k\": [1]} ünïcode", add_special_tokens=True)["input_ids"]
    h.update(json.dumps([len(tok), tok.chat_template, tok.all_special_tokens, probe, backend], default=str).encode())
    return h.hexdigest()[:16]


def cache_dir(run_dir: str | Path) -> Path:
    """Tokenized datasets live next to the runs (one cache for every recipe writing under the same root)."""
    return Path(run_dir).parent / ".cache" / "tokenized"


@dataclass
class PreparedData:
    train: list[dict]  # tokenized examples in dataset order (not packed)
    eval: list[dict]
    stats: DataStats
    eval_stats: DataStats
    key: str
    cache_path: Path | None = None
    cache_hit: bool = False


def prepare_data(data: DataSection, tok, seed: int, cache: Path | None = None) -> PreparedData:
    """Tokenized train/eval examples, read from the cache when the fingerprint matches, else built (and cached)."""
    configure_tokenizer(tok, data)
    key = fingerprint(data, tok, seed)
    path = Path(cache) / key if cache else None
    if path is not None and (path / "stats.json").is_file():
        try:
            return _load_cached(path, key)
        except Exception:  # a damaged cache is rebuilt, never trusted
            shutil.rmtree(path, ignore_errors=True)
    stats, eval_stats = DataStats(), DataStats()
    train_records, eval_records = split_records(data, seed, stats)
    train, _ = tokenize_all(train_records, data, tok, stats)
    evaluation, _ = tokenize_all(eval_records, data, tok, eval_stats)
    prepared = PreparedData(train, evaluation, stats, eval_stats, key, path)
    if path is not None:
        _save_cached(path, prepared)
    return prepared


def _save_cached(path: Path, p: PreparedData) -> None:
    """Written to a temporary directory, then renamed: a cache entry is complete or absent."""
    import datasets

    datasets.disable_progress_bars()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        for name, rows in (("train", p.train), ("eval", p.eval)):
            keys = ("input_ids", "labels", "source") + (("desirable",) if rows and "desirable" in rows[0] else ())
            columns = {k: [r[k] for r in rows] for k in keys}
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps({"train": asdict(p.stats), "eval": asdict(p.eval_stats)}))
        tmp.rename(path)
    except OSError:
        pass  # another process wrote it first, or the disk is read-only: the data is still usable
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(path: Path, key: str) -> PreparedData:
    import datasets

    stats = json.loads((path / "stats.json").read_text())
    train, evaluation = (datasets.load_from_disk(str(path / name)).to_list() for name in ("train", "eval"))
    return PreparedData(train, evaluation, DataStats(**stats["train"]), DataStats(**stats["eval"]), key, path, True)


def train_eval_split(data: DataSection, tok, seed: int, cache: Path | None = None):
    """(train rows, eval rows, train statistics), packed into rows of max_length when `data.packing` is on,
    as (chosen, rejected) `Pairs` for preference data, as `Feedback` (each answer with its KL pair) for feedback."""
    p = prepare_data(data, tok, seed, cache)
    if data.packing:
        return pack(p.train, data.max_length), pack(p.eval, data.max_length), p.stats
    if data.format == "preference" or any(d.format == "preference" for d in data.train_datasets):
        return Pairs(p.train), Pairs(p.eval), p.stats
    if data.format == "feedback" or any(d.format == "feedback" for d in data.train_datasets):
        return Feedback(p.train, data.max_length), Feedback(p.eval, data.max_length), p.stats
    return p.train, p.eval, p.stats
