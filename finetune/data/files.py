"""Reading one local data file (.jsonl/.json/.csv/.parquet) into (where, row) pairs, "file:line" each.

A row that cannot be parsed is a `BadRecord` in its place (reported, or skipped and counted, by read.py), never an
exception out of here: broken JSON, JSON nested past Python's stack, integers of over 4300 digits, strings with
lone surrogates. Lines are split at newlines only, so U+2028 inside a JSON string stays text.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from finetune.errors import DataError, first_line


class BadRecord(Exception):
    """Why one row is unusable; its str is the reason."""

    pass



def read_rows(path: str | Path) -> tuple[list[tuple[str, Any]], list[str]]:
    """(where, row) for every parsed row of a local data file, and a 'where: problem' line for each unparsable one."""
    rows = read_file(Path(path))
    return ([(w, r) for w, r in rows if not isinstance(r, BadRecord)],
            [f"{w}: {r}" for w, r in rows if isinstance(r, BadRecord)])


def read_file(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for every row of a local data file, in file order; an unparsable row is a BadRecord."""
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


def json_value(text: str, decode=json.loads) -> Any:
    """One JSON value, or a BadRecord saying why not: broken JSON, nesting deeper than Python's stack, an integer
    of over 4300 digits, or a string holding a lone surrogate (a "\\ud800" escape), which no tokenizer encodes."""
    try:
        value = decode(text)
    except json.JSONDecodeError as e:
        return BadRecord(f"broken JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return BadRecord("JSON nested deeper than the reader can follow")
    except ValueError as e:  # int(): more than sys.get_int_max_str_digits() digits
        return BadRecord(f"unreadable JSON number ({first_line(e)[:80]})")
    if "\\u" in text and not _encodable(value):
        return BadRecord("a string holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text")
    return value


def _encodable(value: Any) -> bool:
    """True when every string in a parsed JSON value (keys included) encodes as UTF-8."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            stack += v
    return True


def _lines(text: str) -> list[str]:
    """Lines split at \\n (\\r\\n and lone \\r too), as editors and JSON Lines count them: str.splitlines would
    also split inside a JSON string at U+2028, U+0085 or a form feed, which JSON allows unescaped."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _read_jsonl(path: Path, text: str | None = None):
    text = path.read_text(encoding="utf-8-sig") if text is None else text
    rows = []
    for n, line in enumerate(_lines(text), 1):
        if line.strip():
            rows.append((f"{path}:{n}", json_value(line)))
    return rows


def _read_json(path: Path):
    """A JSON array of records (each reported at the line where it starts), or JSON Lines named .json."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [x for x in _lines(text) if x.strip()]
        if len(lines) > 1 and _parses(lines[0]):
            return _read_jsonl(path, text)
        return [(f"{path}:{e.lineno}", BadRecord(f"broken JSON ({e.msg} at column {e.colno})"))]
    except (RecursionError, ValueError):  # too deep, or a huge integer: which record, json_value says
        return _read_json_records(path, text)
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of records (or one JSON object per line), "
                        f"got a JSON {type(doc).__name__}.")
    return _read_json_records(path, text)


def _read_json_records(path: Path, text: str) -> list:
    """The records of a JSON array one by one, each with the line it starts on; the first unreadable one (and
    what follows it, which cannot be delimited) is one BadRecord."""
    start = text.find("[")
    if start < 0:
        return [(f"{path}:1", BadRecord("expected a JSON array of records"))]
    rows, decoder, i, line = [], json.JSONDecoder(), start + 1, 1 + text.count("\n", 0, start)
    skip = re.compile(r"[\s,]*")
    while True:
        j = skip.match(text, i).end()
        line += text.count("\n", i, j)
        if j >= len(text) or text[j] == "]":
            return rows
        found: list = []
        obj = json_value(text, lambda t: found.append(decoder.raw_decode(t, j)) or found[0][0])
        if isinstance(obj, BadRecord):
            return rows + [(f"{path}:{line}", obj)]
        i = found[0][1]
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
