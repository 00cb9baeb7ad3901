"""Dataset loading, prompt rendering, label masking and batch collation.

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
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.errors import DataError
from finetune.recipe import DataSection

IGNORE = -100
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # no response token left after truncation
    lengths: list[int] = field(default_factory=list, repr=False)


# --------------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; broken JSON is reported as file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"Cannot read data file {path}: {e.strerror or e}.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    records, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{n}: broken JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(rec, dict):
            bad.append(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            continue
        records.append((n, rec))
    _raise_bad(bad)
    if not records:
        raise DataError(f"{path}: no records (the file is empty).")
    return records


def _raise_bad(bad: list[str]) -> None:
    if bad:
        more = f"\n... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DataError(f"{len(bad)} bad record(s):\n" + "\n".join(bad[:10]) + more)


def check_record(rec: dict, fmt: str) -> str | None:
    """Why a record cannot be used in this format, or None if it is fine."""
    for key in REQUIRED_FIELDS[fmt]:
        if key not in rec:
            return f"missing field '{key}' (format '{fmt}' needs {', '.join(REQUIRED_FIELDS[fmt])})"
    if fmt == "chat":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list of {role, content} objects"
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            return "no non-empty assistant message to learn from"
        return None
    for key in REQUIRED_FIELDS[fmt] + (("input",) if fmt == "alpaca" and "input" in rec else ()):
        if not isinstance(rec[key], str):
            return f"field '{key}' must be a string, got {type(rec[key]).__name__}"
    response = {"alpaca": "output", "completion": "completion", "text": "text"}[fmt]
    if not rec[response].strip():
        return f"empty '{response}'"
    return None


# ------------------------------------------------------------------- rendering


def to_messages(rec: dict, fmt: str) -> list[dict] | None:
    """Chat messages for chat-like formats; None for formats rendered as plain text."""
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    if fmt == "alpaca":
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
    return None


def segments(rec: dict, fmt: str, tok) -> list[tuple[str, bool]]:
    """The example as (text, is_response) pieces whose concatenation is the full rendered text."""
    messages = to_messages(rec, fmt)
    if messages is not None and tok.chat_template:
        return _chat_segments(messages, tok)
    eos = tok.eos_token or ""
    if fmt == "text":
        return [(rec["text"] + eos, True)]
    if fmt == "completion":
        return [(rec["prompt"], False), (rec["completion"] + eos, True)]
    if fmt == "alpaca":
        template = ALPACA_PROMPT_INPUT if rec.get("input") else ALPACA_PROMPT
        return [(template.format(**rec), False), (rec["output"] + eos, True)]
    raise DataError(
        "Format 'chat' needs a chat template, and this tokenizer has none: set data.chat_template "
        "to a Jinja template (ChatML works for most base models)."
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
                "the response tokens cannot be located exactly; set data.chat_template to a simpler template."
            )
        reply = after[len(before) :]
        start = reply.find(m["content"])
        if start < 0:
            raise DataError("The chat template changes the assistant's text; cannot locate it for label masking.")
        end = start + len(m["content"])
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
    out.append((render(messages, False)[len(done) :], False))
    return [(t, r) for t, r in out if t]


def encode(pieces: list[tuple[str, bool]], tok, train_on: str = "completion") -> tuple[list[int], list[int]]:
    """Token ids and labels of rendered pieces, each piece tokenized on its own (exact boundaries)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_response in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (is_response or train_on == "all") else [IGNORE] * len(piece)
    if _adds_bos(tok) and ids[:1] != [tok.bos_token_id]:
        ids, labels = [tok.bos_token_id] + ids, [IGNORE] + labels
    return ids, labels


def tokenize_example(rec: dict, fmt: str, tok, train_on: str, max_length: int, stats: DataStats) -> dict | None:
    ids, labels = encode(segments(rec, fmt, tok), tok, train_on)
    if len(ids) > max_length:
        stats.truncated += 1
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):
        stats.dropped += 1
        return None
    stats.examples += 1
    stats.tokens += len(ids)
    stats.label_tokens += sum(x != IGNORE for x in labels[1:])
    stats.lengths.append(len(ids))
    return {"input_ids": ids, "labels": labels}


def _adds_bos(tok) -> bool:
    if tok.bos_token_id is None:
        return False
    return tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]


# ---------------------------------------------------------------- data sets


def load_records(files: list[str], fmt: str) -> list[dict]:
    """Validated records from JSONL files; every bad record is reported at once as file:line."""
    records, bad = [], []
    for f in files:
        for line, rec in read_jsonl(f):
            problem = check_record(rec, fmt)
            if problem:
                bad.append(f"{f}:{line}: {problem}")
            else:
                records.append(rec)
    _raise_bad(bad)
    return records


def split_records(data: DataSection, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) records: the eval file, or a seeded `eval_fraction` of train, or none."""
    train = load_records(data.train, data.format)
    if data.eval:
        return train, load_records([data.eval], data.format)
    if not data.eval_fraction:
        return train, []
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(data.eval_fraction * len(train)))])
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def tokenize_all(records: list[dict], data: DataSection, tok) -> tuple[list[dict], DataStats]:
    stats = DataStats()
    examples = [tokenize_example(r, data.format, tok, data.train_on, data.max_length, stats) for r in records]
    examples = [ex for ex in examples if ex is not None]
    if records and not examples:
        raise DataError(f"No usable example: all {stats.dropped} lost their response tokens to truncation "
                        f"(data.max_length={data.max_length}).")
    return examples, stats


def train_eval_split(data: DataSection, tok, seed: int) -> tuple[list[dict], list[dict], DataStats]:
    """Tokenized (train, eval) examples and the training set's statistics."""
    train_records, eval_records = split_records(data, seed)
    train, stats = tokenize_all(train_records, data, tok)
    evaluation, _ = tokenize_all(eval_records, data, tok)
    return train, evaluation, stats


def prompt_and_reference(rec: dict, fmt: str, tok) -> tuple[list[int], str]:
    """Token ids of everything before the first response, and that response's text (for generation)."""
    pieces = segments(rec, fmt, tok)
    first = next(i for i, (_, is_response) in enumerate(pieces) if is_response)
    ids, _ = encode(pieces[:first], tok)
    messages = to_messages(rec, fmt)
    if messages is not None:
        reference = next(m["content"] for m in messages if m["role"] == "assistant")
    else:
        reference = rec["completion"] if fmt == "completion" else rec["text"]
    return ids, reference


@dataclass
class Collator:
    """Right-pads a list of examples into tensors; padding gets label -100 and attention 0."""

    pad_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fingerprint(data: DataSection, tok) -> str:
    """Hash of what determines the tokenized data: file contents, the data section, the tokenizer."""
    import hashlib

    h = hashlib.sha256(data.model_dump_json().encode())
    for f in sorted(set(data.train + ([data.eval] if data.eval else []))):
        h.update(Path(f).read_bytes())
    probe = tok("Fingerprint: 12 + 30 = 42, {\"k\": [1]} ünïcode", add_special_tokens=True)["input_ids"]
    h.update(json.dumps([len(tok), tok.chat_template, tok.all_special_tokens, probe], default=str).encode())
    return h.hexdigest()[:16]
