"""Reading: local files (.jsonl/.json/.csv/.parquet), directories, globs and hub datasets into Records.

Reading keeps the file and line of every record, so a bad record is reported where the user
can fix it (`on_bad_record: error` lists them; `skip` counts them). Every source is normalised
to a few shapes before rendering: alpaca, chat (sharegpt becomes chat), completion, text,
preference and feedback; a format is one entry of `FORMATS`. Mixing weights and the held-out split are here too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from finetune.data.files import BadRecord, json_value, read_file, read_rows  # noqa: F401 (read_rows: exported)
from finetune.data.hub import _hub_offline, _hub_revision
from finetune.errors import DataError, first_line
from finetune.recipe import DATA_EXTENSIONS, FORMAT_FIELDS, DataSection, DatasetSpec, data_files

MAX_LISTED = 10
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool",
}


@dataclass
class Record:
    """One usable record in a normalised shape, with where it came from."""

    fmt: str  # alpaca | chat | completion | text | preference | feedback
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


# --------------------------------------------------------------------- reading


def _read_hub(spec: DatasetSpec):
    dataset = _load_hub(spec)
    label = f"{spec.path}[{spec.split}]"
    return [(f"{label} row {i}", row) for i, row in enumerate(dataset.to_list(), 1)]


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


class _Row:
    """A raw record read through the recipe's field mapping; problems raise BadRecord naming the column."""

    def __init__(self, row: dict, fmt: str, fields: dict[str, str]):
        self.row, self.fmt, self.fields = row, fmt, fields

    def text(self, key: str, required: bool = True, nonempty: bool = False) -> str:
        column = self.fields.get(key, key)
        value = self.row.get(column)
        if value is None:
            if not required:
                return ""
            mapped = f" (as '{key}')" if column != key else ""
            raise BadRecord(f"missing field '{column}'{mapped}; format '{self.fmt}' needs {_needs(self.fmt, self.fields)}")
        if not isinstance(value, str):
            raise BadRecord(f"field '{column}' must be a string, got {type(value).__name__}")
        if nonempty and not value.strip():
            raise BadRecord(f"empty '{column}'")
        return value


def _preference(r: _Row) -> Record:
    """{prompt, chosen, rejected}: prompt a string or chat messages, answers strings or assistant messages;
    or full conversations in chosen/rejected that share the prompt turns (the prefix is split off)."""
    cols = {k: r.fields.get(k, k) for k in ("prompt", "chosen", "rejected")}
    for k in ("chosen", "rejected"):
        if r.row.get(cols[k]) is None:
            raise BadRecord(f"missing field '{cols[k]}'; format 'preference' needs {_needs('preference', r.fields)}")
    prompt = r.row.get(cols["prompt"])
    turns = {k: _turns(r.row[cols[k]], cols[k]) for k in ("chosen", "rejected")}
    if prompt is None:  # full conversations: split off the shared prompt turns
        c, j = turns["chosen"], 0
        while j < min(len(c), len(turns["rejected"])) - 1 and c[j] == turns["rejected"][j]:
            j += 1
        prompt, turns = c[:j], {k: v[j:] for k, v in turns.items()}
    messages = _turns(prompt, cols["prompt"], user=True)
    answers = {}
    for k, t in turns.items():
        if len(t) != 1 or t[0]["role"] != "assistant":
            raise BadRecord(f"'{cols[k]}' must be one answer (a string or one assistant message) after the prompt")
        if not t[0]["content"].strip():
            raise BadRecord(f"empty '{cols[k]}'")
        answers[k] = t[0]["content"]
    if answers["chosen"] == answers["rejected"]:
        raise BadRecord(f"'{cols['chosen']}' and '{cols['rejected']}' are the same answer: nothing to prefer")
    return Record("preference", {"prompt": messages, **answers}, "")


def _feedback(r: _Row) -> Record:
    """{prompt, completion, label}: one answer marked desirable (true) or not (false), unpaired (KTO)."""
    p, c, lab = (r.fields.get(k, k) for k in FORMAT_FIELDS["feedback"])
    for col in (p, c, lab):
        if r.row.get(col) is None:
            raise BadRecord(f"missing field '{col}'; format 'feedback' needs {_needs('feedback', r.fields)}")
    label = r.row[lab] if not isinstance(r.row[lab], str) else {"true": True, "false": False}.get(  # e.g. CSV
        r.row[lab].strip().lower(), r.row[lab])
    answer = _turns(r.row[c], c)
    if label not in (True, False) or len(answer) != 1 or answer[0]["role"] != "assistant" or not answer[0]["content"].strip():
        raise BadRecord(f"'{lab}' must be true (a desirable answer) or false (undesirable), got {label!r}"
                         if label not in (True, False) else f"'{c}' must be one non-empty answer (a string or one "
                         "assistant message)")
    return Record("feedback", {"prompt": _turns(r.row[p], p, user=True), "completion": answer[0]["content"],
                               "label": bool(label)}, "")


def _turns(value: Any, column: str, user: bool = False) -> list[dict]:
    """A string (one user or assistant turn) or a list of {role, content} messages."""
    if isinstance(value, str):
        return [{"role": "user" if user else "assistant", "content": value}]
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise BadRecord(f"'{column}' must be a string or a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# One entry per record format: how a raw row becomes a Record (rendering is in render.py).
FORMATS = {
    "alpaca": lambda r: Record("alpaca", {"instruction": r.text("instruction"), "input": r.text("input", False),
                                          "output": r.text("output", nonempty=True)}, ""),
    "completion": lambda r: Record("completion", {"prompt": r.text("prompt"),
                                                  "completion": r.text("completion", nonempty=True)}, ""),
    "text": lambda r: Record("text", {"text": r.text("text", nonempty=True)}, ""),
    "chat": lambda r: Record("chat", {"messages": _messages(r.row, r.fields, "messages", "role", "content", None)}, ""),
    "sharegpt": lambda r: Record("chat", {"messages": _messages(r.row, r.fields, "conversations", "from", "value",
                                                                SHAREGPT_ROLES)}, ""),
    "preference": _preference,
    "feedback": _feedback,
}


def normalize(row: Any, fmt: str, fields: dict[str, str]) -> Record:
    """The row in canonical field names (sharegpt read into chat messages); raises BadRecord with the reason."""
    if isinstance(row, BadRecord):
        raise row
    if not isinstance(row, dict):
        raise BadRecord(f"expected a record (JSON object), got {type(row).__name__}")
    return FORMATS[fmt](_Row(row, fmt, fields))


def _messages(row: dict, fields: dict, list_key: str, role_key: str, content_key: str, roles: dict | None) -> list:
    column, role_col, content_col = (fields.get(k, k) for k in (list_key, role_key, content_key))
    turns = row.get(column)
    if turns is None:
        raise BadRecord(f"missing field '{column}' (a list of {{{role_col}, {content_col}}} objects)")
    if isinstance(turns, str):  # e.g. a CSV cell holding JSON
        parsed = json_value(turns)
        if isinstance(parsed, BadRecord) and turns.lstrip().startswith("["):
            raise BadRecord(f"'{column}' holds text that is not a JSON list of messages: {parsed}")
        turns = parsed if not isinstance(parsed, BadRecord) else turns
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"'{column}' must be a non-empty list of {{{role_col}, {content_col}}} objects")
    messages = []
    for i, m in enumerate(turns):
        if not (isinstance(m, dict) and isinstance(m.get(role_col), str) and isinstance(m.get(content_col), str)):
            raise BadRecord(f"{column}[{i}] must be an object with string '{role_col}' and '{content_col}'")
        role = m[role_col] if roles is None else roles.get(m[role_col].lower())
        if role is None:
            raise BadRecord(f"{column}[{i}]: unknown {role_col} '{m[role_col]}' (known: {', '.join(roles)})")
        messages.append({"role": role, "content": m[content_col]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no non-empty assistant message to learn from")
    return messages


def _needs(fmt: str, fields: dict) -> str:
    required = [k for k in FORMAT_FIELDS[fmt] if k not in ("input", "role", "content", "from", "value")
                and not (fmt == "preference" and k == "prompt")]
    return ", ".join(fields.get(k, k) for k in required)


def load_source(spec: DatasetSpec) -> tuple[list[Record], list[str]]:
    """Usable records of one dataset, and a 'where: problem' line for each bad one."""
    files = data_files(spec.path)
    if files is None:
        rows = _read_hub(spec)
    elif not files:
        raise DataError(f"'{spec.path}' names no {'/'.join(DATA_EXTENSIONS)} file.")
    else:
        rows = [row for f in files for row in read_file(f)]
    records, bad = [], []
    for where, row in rows:
        try:
            rec = normalize(row, spec.format, spec.fields)
        except BadRecord as e:
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


