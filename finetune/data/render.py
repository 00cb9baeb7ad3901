"""Rendering: records -> chat messages -> token ids with labels (-100 = no loss), templates, train_on.

With `train_on: completion`, exactly the response tokens carry labels: the assistant's text and
the end-of-turn token that follows it (a model that never sees that token as a target never
learns to stop). Rendering splits the conversation into segments at turn boundaries by asking
the chat template for each prefix of the conversation; each segment is tokenized on its own, so
the trained span is exact even where a template adds text between turns (system prompts, headers).
A preference record renders into two examples, chosen then rejected, labelled on the last answer only; a
feedback record into one such example, with its label as `desirable`.
"""

from __future__ import annotations

from finetune.data.read import DataStats, Record
from finetune.errors import DataError, first_line
from finetune.recipe import DataSection
from finetune.recipe import ALPACA, MARKERS

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


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
    if rec.fmt == "answer":  # one side of a preference pair: only the final answer is trained
        if not tok.chat_template:
            return [("\n\n".join(m["content"] for m in d["prompt"]), False), (d["answer"] + eos, True)]
        pieces = _chat_segments(d["prompt"] + [{"role": "assistant", "content": d["answer"]}], tok)
        last = max(i for i, (_, response) in enumerate(pieces) if response)
        return [(text, response and i == last) for i, (text, response) in enumerate(pieces)]
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
        try:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # the template is code from the recipe or the model: a syntax error, a
            # raise_exception(...) of its own, an undefined name, 1/0: all of them the template's, not ours
            raise DataError(
                f"The chat template (data.template, else the tokenizer's) fails on a conversation of {len(msgs)} "
                f"message(s), roles {', '.join(m['role'][:20] for m in msgs) or '(none)'}: {type(e).__name__}: "
                f"{first_line(e)[:200]}. Fix the template or set data.template to chatml, llama-3 or alpaca."
            ) from None

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
    """(examples, stats): tokenized records, truncated or dropped per `data.overlong`, in order.
    A preference record gives two examples, chosen then rejected, kept or dropped together."""
    configure_tokenizer(tok, data)
    stats = stats if stats is not None else DataStats()
    expanded = [_sides(r) for r in records]
    pieces = [_segments_at(side, tok) for sides in expanded for side in sides]
    flat = [text for p in pieces for text, _ in p]
    all_ids = iter(tok(flat, add_special_tokens=False)["input_ids"] if flat else [])
    bos = _bos_to_add(tok)
    examples, pieces = [], iter(pieces)
    for rec, sides in zip(records, expanded):
        fitted, trial = [], DataStats()
        for side in sides:
            p = next(pieces)
            ids, labels = encode(p, [next(all_ids) for _ in p], bos, "completion" if side.fmt == "answer" else data.train_on)
            fitted.append(_fit(ids, labels, data, trial))
        stats.lengths += trial.lengths
        stats.truncated += trial.truncated
        if any(ex is None for ex in fitted):
            stats.dropped += 1
            continue
        stats.examples, stats.tokens, stats.label_tokens = (stats.examples + trial.examples, stats.tokens + trial.tokens,
                                                            stats.label_tokens + trial.label_tokens)
        for ex in fitted:
            ex["source"] = rec.where
            if rec.fmt == "feedback":  # KTO's label travels with the example (data/feedback.py)
                ex["desirable"] = rec.data["label"]
            examples.append(ex)
    if records and not examples:
        raise DataError(f"No usable example: all {stats.dropped} were over data.max_length={data.max_length} or "
                        "lost their response tokens to truncation.")
    return examples, stats


def _segments_at(rec: Record, tok) -> list[tuple[str, bool]]:
    """`segments`, with a rendering error prefixed by the record it happened on (file:line)."""
    try:
        return segments(rec, tok)
    except DataError as e:
        raise DataError(f"{rec.where}: {e}" if rec.where else str(e)) from None


def _sides(rec: Record) -> list[Record]:
    """The examples a record renders to: itself, a preference pair's chosen and rejected answers, or a feedback
    record's one answer (trained on that answer only, like a side of a pair)."""
    if rec.fmt == "feedback":
        return [Record("answer", {"prompt": rec.data["prompt"], "answer": rec.data["completion"]}, rec.where)]
    if rec.fmt != "preference":
        return [rec]
    return [Record("answer", {"prompt": rec.data["prompt"], "answer": rec.data[k]}, rec.where)
            for k in ("chosen", "rejected")]


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


