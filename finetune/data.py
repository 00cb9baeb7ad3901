"""Datasets in, tokenized examples out: reading, rendering, label masking, packing, caching.

Every example becomes `input_ids` plus `labels`, where a label of -100 means
"no loss here". With `train_on: completion`, exactly the response tokens carry
labels: the assistant's text and the end-of-turn token that follows it (a model
that never sees that token as a target never learns to stop). Padding is masked
by position in the collator, never by token id, so a tokenizer whose pad token
is also its EOS token keeps its EOS labels.

Rendering splits the conversation into segments at turn boundaries by asking the
chat template for each prefix of the conversation; each segment is tokenized on
its own, so the trained span is exact even where a template adds text between
turns (system prompts, headers).

Reading keeps the file and line of every record, so a bad record is reported
where the user can fix it. All sources are normalised to four shapes (alpaca,
chat, completion, text; sharegpt becomes chat) before rendering.

Packing concatenates examples into rows of `max_length` with `position_ids`
restarting at 0 for each example and no attention mask: transformers then builds
a block-diagonal causal mask from the position ids, so no example attends to
another (this only happens with `attention_mask=None` and no KV cache, i.e. the
model is called with `use_cache=False`). The first label of every packed example
is -100, so nothing is learned across a boundary.
"""

from __future__ import annotations

import bisect
import csv
import functools
import hashlib
import json
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.errors import DataError, first_line
from finetune.recipe import DATA_EXTENSIONS, FORMAT_FIELDS, DataSection, DatasetSpec, data_files
from finetune.templates import ALPACA, MARKERS

IGNORE = -100
CACHE_VERSION = 1  # bump when tokenization changes, so older caches are not reused
MAX_LISTED = 10
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool",
}


@dataclass
class Record:
    """One usable record in a normalised shape, with where it came from."""

    fmt: str  # alpaca | chat | completion | text
    data: dict
    where: str  # "file:line" (or "file row N", "hub-id[split] row N")


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0  # after truncation
    label_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # over max_length with overlong=drop, or no response token left after truncation
    skipped: int = 0  # bad records skipped (on_bad_record: skip)
    bad: list[str] = field(default_factory=list, repr=False)  # the first of those, as file:line: problem
    lengths: list[int] = field(default_factory=list, repr=False)  # token lengths before truncation
    sources: list[dict] = field(default_factory=list, repr=False)  # per dataset: records, skipped, train, eval


class _BadRecord(Exception):
    pass


# --------------------------------------------------------------------- reading


def read_rows(path: str | Path) -> tuple[list[tuple[str, Any]], list[str]]:
    """(where, row) for every parsed row of a local data file, and a 'where: problem' line for each unparsable one."""
    rows = _read_file(Path(path))
    return ([(w, r) for w, r in rows if not isinstance(r, _BadRecord)],
            [f"{w}: {r}" for w, r in rows if isinstance(r, _BadRecord)])


def _read_file(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for every row of a local data file, in file order; an unparsable row is a _BadRecord."""
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(readers)}.")
    try:
        return reader(path)
    except OSError as e:
        raise DataError(f"Cannot read data file {path}: {e.strerror or e}.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None


def _read_jsonl(path: Path, text: str | None = None):
    text = path.read_text(encoding="utf-8-sig") if text is None else text
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((f"{path}:{n}", _BadRecord(f"broken JSON ({e.msg} at column {e.colno})")))
    return rows


def _read_json(path: Path):
    """A JSON array of records (each reported at the line where it starts), or JSON Lines named .json."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [x for x in text.splitlines() if x.strip()]
        if len(lines) > 1 and _parses(lines[0]):
            return _read_jsonl(path, text)
        return [(f"{path}:{e.lineno}", _BadRecord(f"broken JSON ({e.msg} at column {e.colno})"))]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of records (or one JSON object per line), "
                        f"got a JSON {type(doc).__name__}.")
    rows, decoder, i, line = [], json.JSONDecoder(), text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    skip = re.compile(r"[\s,]*")
    while True:
        j = skip.match(text, i).end()
        line += text.count("\n", i, j)
        if text[j] == "]":
            return rows
        obj, i = decoder.raw_decode(text, j)
        rows.append((f"{path}:{line}", obj))
        line += text.count("\n", j, i)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _read_csv(path: Path):
    csv.field_size_limit(2**31 - 1)  # long texts are normal in training data
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames  # reads the header
        start = reader.line_num + 1
        for row in reader:
            rows.append((f"{path}:{start}", {k: v for k, v in row.items() if k is not None and v is not None}))
            start = reader.line_num + 1
    return rows


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)}).") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def _read_hub(spec: DatasetSpec):
    dataset = _load_hub(spec)
    label = f"{spec.path}[{spec.split}]"
    return [(f"{label} row {i}", row) for i, row in enumerate(dataset.to_list(), 1)]


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def _hub_revision(path: str, revision: str | None) -> str:
    """The commit a hub dataset resolves to; fails fast (one request, short timeout) when the hub is unreachable.

    datasets.load_dataset itself retries for about half a minute before giving up on a machine
    without network, so this probe runs first.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(path, revision=revision, timeout=10).sha or ""
    except GatedRepoError:
        raise DataError(f"Hub dataset '{path}' is gated: accept its terms on the hub and log in "
                        "(`hf auth login` or HF_TOKEN).") from None
    except RevisionNotFoundError:
        raise DataError(f"Hub dataset '{path}' has no revision '{revision}'.") from None
    except RepositoryNotFoundError:
        raise DataError(f"'{path}' is not a local file, directory or glob pattern, nor a dataset on the Hugging Face "
                        f"hub (relative paths are read from the current directory, {Path.cwd()}).") from None
    except Exception as e:  # no network: connection, DNS or timeout errors of the HTTP client
        raise DataError(
            f"Cannot reach the Hugging Face hub to load dataset '{path}' ({first_line(e)}). On a machine without "
            "network, point the recipe at local files, or set HF_HUB_OFFLINE=1 to use a copy already in the "
            "local Hugging Face cache."
        ) from None


def _load_hub(spec: DatasetSpec):
    import datasets

    if not _hub_offline():
        _hub_revision(spec.path, spec.revision)
    try:
        return datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is used)" if _hub_offline() else ""
        raise DataError(f"Cannot load hub dataset '{spec.path}' (name={spec.name}, split={spec.split}){offline}: "
                        f"{first_line(e)}") from None


# --------------------------------------------------------------- normalising


def normalize(row: Any, fmt: str, fields: dict[str, str]) -> Record:
    """The row in canonical field names (sharegpt read into chat messages); raises _BadRecord with the reason."""
    if isinstance(row, _BadRecord):
        raise row
    if not isinstance(row, dict):
        raise _BadRecord(f"expected a record (JSON object), got {type(row).__name__}")

    def name(key: str) -> str:
        return fields.get(key, key)

    def text(key: str, required: bool = True, nonempty: bool = False) -> str:
        column = name(key)
        value = row.get(column)
        if value is None:
            if not required:
                return ""
            mapped = f" (as '{key}')" if column != key else ""
            raise _BadRecord(f"missing field '{column}'{mapped}; format '{fmt}' needs {_needs(fmt, fields)}")
        if not isinstance(value, str):
            raise _BadRecord(f"field '{column}' must be a string, got {type(value).__name__}")
        if nonempty and not value.strip():
            raise _BadRecord(f"empty '{column}'")
        return value

    if fmt == "alpaca":
        data = {"instruction": text("instruction"), "input": text("input", required=False),
                "output": text("output", nonempty=True)}
        return Record("alpaca", data, "")
    if fmt == "completion":
        return Record("completion", {"prompt": text("prompt"), "completion": text("completion", nonempty=True)}, "")
    if fmt == "text":
        return Record("text", {"text": text("text", nonempty=True)}, "")
    if fmt == "chat":
        return Record("chat", {"messages": _messages(row, fields, "messages", "role", "content", None)}, "")
    return Record("chat", {"messages": _messages(row, fields, "conversations", "from", "value", SHAREGPT_ROLES)}, "")


def _messages(row: dict, fields: dict, list_key: str, role_key: str, content_key: str, roles: dict | None) -> list:
    column, role_col, content_col = (fields.get(k, k) for k in (list_key, role_key, content_key))
    turns = row.get(column)
    if turns is None:
        raise _BadRecord(f"missing field '{column}' (a list of {{{role_col}, {content_col}}} objects)")
    if isinstance(turns, str):  # e.g. a CSV cell holding JSON
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            pass
    if not isinstance(turns, list) or not turns:
        raise _BadRecord(f"'{column}' must be a non-empty list of {{{role_col}, {content_col}}} objects")
    messages = []
    for i, m in enumerate(turns):
        if not (isinstance(m, dict) and isinstance(m.get(role_col), str) and isinstance(m.get(content_col), str)):
            raise _BadRecord(f"{column}[{i}] must be an object with string '{role_col}' and '{content_col}'")
        role = m[role_col] if roles is None else roles.get(m[role_col].lower())
        if role is None:
            raise _BadRecord(f"{column}[{i}]: unknown {role_col} '{m[role_col]}' (known: {', '.join(roles)})")
        messages.append({"role": role, "content": m[content_col]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _BadRecord("no non-empty assistant message to learn from")
    return messages


def _needs(fmt: str, fields: dict) -> str:
    required = [k for k in FORMAT_FIELDS[fmt] if k not in ("input", "role", "content", "from", "value")]
    return ", ".join(fields.get(k, k) for k in required)


def load_source(spec: DatasetSpec) -> tuple[list[Record], list[str]]:
    """Usable records of one dataset, and a 'where: problem' line for each bad one."""
    files = data_files(spec.path)
    if files is None:
        rows = _read_hub(spec)
    elif not files:
        raise DataError(f"'{spec.path}' names no {'/'.join(DATA_EXTENSIONS)} file.")
    else:
        rows = [row for f in files for row in _read_file(f)]
    records, bad = [], []
    for where, row in rows:
        try:
            rec = normalize(row, spec.format, spec.fields)
        except _BadRecord as e:
            bad.append(f"{where}: {e}")
            continue
        rec.where = where
        records.append(rec)
    return records, bad


def _raise_bad(bad: list[str]) -> None:
    if bad:
        more = f"\n... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(
            f"{len(bad)} bad record(s):\n" + "\n".join(bad[:MAX_LISTED]) + more
            + "\nFix them, or set data.on_bad_record=skip to leave them out (they are counted)."
        )


def _resample(records: list, target: int, rng: random.Random) -> list:
    """`target` records: whole copies of the list, then a random sample of the rest."""
    copies, rest = divmod(target, len(records))
    return records * copies + rng.sample(records, rest)


def split_records(data: DataSection, seed: int, stats: DataStats | None = None) -> tuple[list[Record], list[Record]]:
    """(train, eval) records of every source, mixed per the recipe; bad records raise or are counted."""
    stats = stats if stats is not None else DataStats()
    loaded = [(spec, *load_source(spec)) for spec in data.train_datasets]
    held_out = [(spec, *load_source(spec)) for spec in data.eval_datasets]
    bad = [b for _, _, bs in loaded + held_out for b in bs]
    if data.on_bad_record == "error":
        _raise_bad(bad)
    stats.skipped += len(bad)
    stats.bad += bad[: MAX_LISTED - len(stats.bad)]
    train, evaluation = [], []
    for i, (spec, records, bad_here) in enumerate(loaded):
        if not records:
            raise DataError(f"{spec.path}: no usable records ({len(bad_here)} bad).")
        rng = random.Random(f"{seed}/{i}")
        held = []
        if data.eval_fraction and not data.eval:
            order = list(range(len(records)))
            rng.shuffle(order)
            cut = set(order[: max(1, round(data.eval_fraction * len(records)))])
            held = [r for j, r in enumerate(records) if j in cut]
            records = [r for j, r in enumerate(records) if j not in cut]
        target = spec.num_samples or (round(spec.weight * len(records)) if spec.weight else len(records))
        mixed = _resample(records, target, rng) if records and target != len(records) else records
        train += mixed
        evaluation += held
        stats.sources.append({"source": spec.path, "format": spec.format, "records": len(records) + len(held),
                              "skipped": len(bad_here), "train": len(mixed), "eval": len(held)})
    for spec, records, bad_here in held_out:
        evaluation += records
        stats.sources.append({"source": spec.path, "format": spec.format, "records": len(records),
                              "skipped": len(bad_here), "train": 0, "eval": len(records)})
    return train, evaluation


# ------------------------------------------------------------------- rendering


def configure_tokenizer(tok, data: DataSection) -> None:
    """Apply `template: none` and check that a named built-in template's markers are single tokens."""
    if data.template == "none":
        tok.chat_template = None
    for marker in MARKERS.get(data.template, ()):
        if len(tok(marker, add_special_tokens=False)["input_ids"]) != 1:
            raise DataError(
                f"data.template={data.template} needs '{marker}' as one special token, but this tokenizer "
                "splits it into pieces (the model would never learn to end a turn). Use the tokenizer's own "
                "template (leave data.template unset), another built-in one, or a Jinja string."
            )


def to_messages(rec: Record) -> list[dict] | None:
    """Chat messages for instruction-like records; None for raw text."""
    if rec.fmt == "chat":
        return rec.data["messages"]
    if rec.fmt == "alpaca":
        prompt = rec.data["instruction"] + (f"\n\n{rec.data['input']}" if rec.data["input"] else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec.data["output"]}]
    if rec.fmt == "completion":
        prompt, completion = rec.data["prompt"], rec.data["completion"]
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return None


def segments(rec: Record, tok) -> list[tuple[str, bool]]:
    """The example as (text, is_response) pieces whose concatenation is the full rendered text.

    Instruction-like records (alpaca, completion, chat) go through the chat template when there
    is one; alpaca records use the classic Alpaca prompt (with its Input section) without a chat
    template or under `template: alpaca`; completion records without one are prompt + completion.
    """
    eos = tok.eos_token or ""
    d = rec.data
    if rec.fmt == "text":
        return [(d["text"] + eos, True)]
    if rec.fmt == "alpaca" and (not tok.chat_template or tok.chat_template == ALPACA):
        return [((ALPACA_PROMPT_INPUT if d["input"] else ALPACA_PROMPT).format(**d), False), (d["output"] + eos, True)]
    if tok.chat_template:
        return _chat_segments(to_messages(rec), tok)
    if rec.fmt == "completion":
        return [(d["prompt"], False), (d["completion"] + eos, True)]
    raise DataError(
        "Chat data needs a chat template, and this tokenizer has none: set data.template to chatml, "
        "llama-3, alpaca or a Jinja template string."
    )


def _chat_segments(messages: list[dict], tok) -> list[tuple[str, bool]]:
    def render(msgs: list[dict], gen: bool) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    specials = [s for s in tok.all_special_tokens if s]
    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                "The chat template renders earlier turns differently once later turns are added, so "
                "the response tokens cannot be located exactly; set data.template to a simpler template."
            )
        reply = after[len(before) :]
        content = m["content"] if m["content"] in reply else m["content"].strip()  # templates may trim
        start = reply.find(content)
        if start < 0:
            raise DataError("The chat template changes the assistant's text; cannot locate it for label masking.")
        end = start + len(content)
        # The response ends with the template's end-of-turn token (e.g. <|im_end|>, <|eot_id|>);
        # whatever the template puts after it (a newline) is not something to learn.
        hits = [(reply.find(s, end), s) for s in specials if reply.find(s, end) >= 0]
        if hits:
            pos, s = min(hits)
            end = pos + len(s)
            response = reply[:end]
        else:
            response = reply[:end] + (tok.eos_token or "")
        out += [(before[len(done) :], False), (response, True), (reply[end:], False)]
        done = after
    full = done if messages[-1]["role"] == "assistant" else render(messages, False)
    out.append((full[len(done) :], False))
    return [(t, r) for t, r in out if t]


def _bos_to_add(tok) -> int | None:
    """The BOS id when the tokenizer normally adds one (the rendered text may already start with it)."""
    if tok.bos_token_id is None:
        return None
    return tok.bos_token_id if tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id] else None


def encode(pieces: list[tuple[str, bool]], piece_ids: list[list[int]], bos: int | None,
           train_on: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of rendered pieces (each tokenized on its own, so boundaries are exact)."""
    ids: list[int] = []
    labels: list[int] = []
    for (_, is_response), piece in zip(pieces, piece_ids):
        ids += piece
        labels += piece if (is_response or train_on == "all") else [IGNORE] * len(piece)
    if bos is not None and ids[:1] != [bos]:
        ids, labels = [bos] + ids, [IGNORE] + labels
    return ids, labels


def tokenize_all(records: list[Record], data: DataSection, tok, stats: DataStats | None = None):
    """(examples, stats): tokenized records, truncated or dropped per `data.overlong`, in order."""
    configure_tokenizer(tok, data)
    stats = stats if stats is not None else DataStats()
    pieces = [segments(r, tok) for r in records]
    flat = [text for p in pieces for text, _ in p]
    all_ids = iter(tok(flat, add_special_tokens=False)["input_ids"] if flat else [])
    bos = _bos_to_add(tok)
    examples = []
    for rec, p in zip(records, pieces):
        ids, labels = encode(p, [next(all_ids) for _ in p], bos, data.train_on)
        ex = _fit(ids, labels, data, stats)
        if ex is not None:
            ex["source"] = rec.where
            examples.append(ex)
    if records and not examples:
        raise DataError(f"No usable example: all {stats.dropped} were over data.max_length={data.max_length} or "
                        "lost their response tokens to truncation.")
    return examples, stats


def _fit(ids: list[int], labels: list[int], data: DataSection, stats: DataStats) -> dict | None:
    stats.lengths.append(len(ids))
    if len(ids) > data.max_length:
        if data.overlong == "drop":
            stats.dropped += 1
            return None
        stats.truncated += 1
        ids, labels = ids[: data.max_length], labels[: data.max_length]
    if all(x == IGNORE for x in labels[1:]):
        stats.dropped += 1
        return None
    stats.examples += 1
    stats.tokens += len(ids)
    stats.label_tokens += sum(x != IGNORE for x in labels[1:])
    return {"input_ids": ids, "labels": labels}


def prompt_and_reference(rec: Record, fmt: str | None, tok) -> tuple[list[int], str]:
    """Token ids of everything before the first response, and that response's text (for generation).

    `fmt` is accepted for callers that pass the data's format; a record knows its own.
    """
    pieces = segments(rec, tok)
    first = next(i for i, (_, is_response) in enumerate(pieces) if is_response)
    prompt = pieces[:first]
    ids, _ = encode(prompt, [tok(t, add_special_tokens=False)["input_ids"] for t, _ in prompt], _bos_to_add(tok), "all")
    if rec.fmt == "text":
        return ids, rec.data["text"]
    return ids, next(m["content"] for m in to_messages(rec) if m["role"] == "assistant")


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
            columns = {k: [r[k] for r in rows] for k in ("input_ids", "labels", "source")}
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
    """(train rows, eval rows, train statistics), packed into rows of max_length when `data.packing` is on."""
    p = prepare_data(data, tok, seed, cache)
    if data.packing:
        return pack(p.train, data.max_length), pack(p.eval, data.max_length), p.stats
    return p.train, p.eval, p.stats
