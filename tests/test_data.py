"""Rendering and label masking: exactly the response tokens (and the end-of-turn token after each) are
trained, for every format and template; bad records are reported by file and line."""

import json
import re

import pytest
from transformers import AutoTokenizer

from finetune.data import (
    IGNORE, Collator, DataStats, normalize, prompt_and_reference, read_rows, split_records, tokenize_all,
)
from finetune.errors import DataError, RecipeError
from finetune.model.load import load_tokenizer
from finetune.recipe.schema import DataSection
from finetune.recipe.file import load_recipe
from finetune.recipe.templates import BUILTIN

from conftest import write_jsonl


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


def tokenize(row, fmt, tok, fields=None, **data):
    """One raw row through normalisation and tokenization, as the pipeline does it."""
    section = DataSection(train=["unused.jsonl"], format=fmt, **data)
    rec = normalize(row, fmt, fields or {})
    examples, _ = tokenize_all([rec], section, tok)
    return examples[0]


def tokenizer(path, **data):
    return load_tokenizer(str(path), DataSection(train=["unused.jsonl"], **data).chat_template)


CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, of course."},
    ]
}


@pytest.mark.parametrize("fixture,eot", [
    ("tiny_tokenizer_dir", "<|im_end|>"), ("tiny_llama3_tokenizer_dir", "<|eot_id|>"),
])
def test_chat_masks_exactly_every_assistant_turn(request, fixture, eot):
    tok = tokenizer(request.getfixturevalue(fixture))
    ex = tokenize(CHAT, "chat", tok)
    assert trained_text(tok, ex) == f"Blue.{eot}Green, of course.{eot}"
    # the full sequence is exactly what the chat template renders
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CHAT["messages"], tokenize=False)


@pytest.mark.parametrize("template,fixture,eot", [
    ("chatml", "tiny_tokenizer_dir", "<|im_end|>"),
    ("llama-3", "tiny_llama3_tokenizer_dir", "<|eot_id|>"),
    ("alpaca", "tiny_tokenizer_dir", "<|im_end|>"),  # alpaca ends a response with EOS
])
def test_builtin_templates_mask_exactly_the_responses(request, template, fixture, eot):
    path = request.getfixturevalue(fixture)
    tok = tokenizer(path, template=template)
    assert tok.chat_template == BUILTIN[template]
    chat = tokenize(CHAT, "chat", tok, template=template)
    assert trained_text(tok, chat) == f"Blue.{eot}Green, of course.{eot}"
    alpaca = tokenize({"instruction": "Repeat the word twice.", "input": "cat", "output": "cat cat"}, "alpaca", tok,
                      template=template)
    assert trained_text(tok, alpaca) == f"cat cat{eot}"
    if template == "alpaca":  # the classic Alpaca prompt, Input section included
        assert tok.decode(alpaca["input_ids"]).startswith("### Instruction:\nRepeat the word twice.\n\n### Input:\ncat")


def test_template_needs_its_markers_as_special_tokens(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir, template="llama-3")
    with pytest.raises(DataError, match=re.escape("'<|start_header_id|>' as one special token")):
        tokenize(CHAT, "chat", tok, template="llama-3")


def test_alpaca_through_chat_template(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir)
    rec = {"instruction": "Repeat the word twice.", "input": "cat", "output": "cat cat"}
    ex = tokenize(rec, "alpaca", tok)
    assert trained_text(tok, ex) == "cat cat<|im_end|>"
    assert "<|im_start|>user\nRepeat the word twice.\n\ncat<|im_end|>" in tok.decode(ex["input_ids"])


def test_alpaca_without_chat_template_ends_with_eos(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir)
    ex = tokenize({"instruction": "Say hi.", "output": "hi there"}, "alpaca", tok, template="none")
    assert tok.chat_template is None
    assert trained_text(tok, ex) == "hi there" + tok.eos_token
    assert tok.decode(ex["input_ids"]).startswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_sharegpt_with_remapped_fields(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir)
    row = {"dialog": [{"speaker": "system", "text": "You are terse."}, {"speaker": "human", "text": "Name a color."},
                      {"speaker": "gpt", "text": "Blue."}, {"speaker": "human", "text": "Another one?"},
                      {"speaker": "gpt", "text": "Green, of course."}]}
    ex = tokenize(row, "sharegpt", tok, {"conversations": "dialog", "from": "speaker", "value": "text"})
    assert ex["input_ids"] == tokenize(CHAT, "chat", tok)["input_ids"]
    assert trained_text(tok, ex) == "Blue.<|im_end|>Green, of course.<|im_end|>"


def test_completion_with_remapped_fields(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir)
    row = {"question": "What is the capital of France?", "answer": "Paris is the capital.", "id": 7}
    fields = {"prompt": "question", "completion": "answer"}
    chat = tokenize(row, "completion", tok, fields)
    assert trained_text(tok, chat) == "Paris is the capital.<|im_end|>"
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in tok.decode(chat["input_ids"])
    raw = tokenize(row, "completion", tok, fields, template="none")
    assert tok.decode(raw["input_ids"]) == "What is the capital of France?Paris is the capital.<|im_end|>"
    assert trained_text(tok, raw) == "Paris is the capital.<|im_end|>"
    prompt, reference = prompt_and_reference(normalize(row, "completion", fields), "completion", tok)
    assert tok.decode(prompt) == "What is the capital of France?" and reference == "Paris is the capital."


def test_train_on_all_and_text_format(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir)
    ex = tokenize({"instruction": "Say hi.", "output": "hi"}, "alpaca", tok, train_on="all")
    assert all(lab != IGNORE for lab in ex["labels"])
    ex = tokenize({"body": "plain words"}, "text", tok, {"text": "body"})
    assert trained_text(tok, ex) == "plain words" + tok.eos_token


def test_eos_label_survives_padding_when_pad_is_eos(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir)
    assert tok.pad_token_id == tok.eos_token_id  # the hard case, as in SmolLM2
    short = tokenize({"instruction": "a", "output": "b"}, "alpaca", tok)
    long = tokenize({"instruction": "a longer instruction here", "output": "a longer answer"}, "alpaca", tok)
    batch = Collator(tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    row = batch["labels"][0]
    assert tok.eos_token_id in row[:n].tolist()  # the end-of-turn token is still a target
    assert (row[n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()


def test_tokenizer_without_pad_gets_one(tiny_llama3_tokenizer_dir):
    tok = tokenizer(tiny_llama3_tokenizer_dir)
    assert tok.pad_token == tok.eos_token


def test_truncation_and_drop_are_counted(tiny_tokenizer_dir):
    tok = tokenizer(tiny_tokenizer_dir)
    long = normalize({"instruction": "word " * 50, "output": "answer " * 50}, "alpaca", {})
    short = normalize({"instruction": "hi", "output": "yo"}, "alpaca", {})
    labels = tokenize({"instruction": "word " * 50, "output": "x"}, "alpaca", tok)["labels"]
    prompt_len = next(i for i, lab in enumerate(labels) if lab != IGNORE)  # tokens before the response

    def run(max_length, overlong="truncate"):
        section = DataSection(train=["x.jsonl"], max_length=max_length, overlong=overlong)
        stats = DataStats()
        examples, _ = tokenize_all([long, short, long], section, tok, stats)
        return examples, stats

    examples, stats = run(prompt_len + 5)
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 2, 0)
    assert max(len(e["input_ids"]) for e in examples) == prompt_len + 5
    _, stats = run(prompt_len)  # nothing of the response is left: dropped
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 2, 2)
    examples, stats = run(prompt_len + 5, overlong="drop")
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 2)
    assert stats.lengths[0] > prompt_len + 5  # lengths are measured before truncation


BAD_ROWS = [
    {"instruction": "a", "output": "b"},
    {"instruction": "a"},  # missing field
    {"instruction": "a", "output": "  "},  # empty response
    {"instruction": 3, "output": "b"},  # wrong type
    ["not", "an", "object"],
]


def test_bad_records_are_listed_by_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in BAD_ROWS) + '\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError) as e:
        split_records(DataSection(train=[str(path)]), seed=0)
    msg = str(e.value)
    assert "5 bad record(s)" in msg and "on_bad_record=skip" in msg
    assert f"{path}:2: missing field 'output'" in msg and f"{path}:3: empty 'output'" in msg
    assert f"{path}:4: field 'instruction' must be a string, got int" in msg
    assert f"{path}:5: expected a record" in msg and f"{path}:6: broken JSON" in msg
    other = tmp_path / "x.jsonl"
    other.write_text('{}\n{"a": \n')
    assert read_rows(other) == ([(f"{other}:1", {})], [f"{other}:2: broken JSON (Expecting value at column 7)"])


def test_bad_records_name_the_mapped_column_and_are_capped_at_ten(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": "q"}] * 12 + [{"question": "q", "answer": "a"}])
    data = DataSection(train=[str(path)], format="completion", fields={"prompt": "question", "completion": "answer"})
    with pytest.raises(DataError) as e:
        split_records(data, seed=0)
    msg = str(e.value)
    assert f"{path}:1: missing field 'answer' (as 'completion')" in msg and f"{path}:10:" in msg
    assert f"{path}:11:" not in msg and "... and 2 more" in msg


def test_skipped_bad_records_are_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, BAD_ROWS)
    stats = DataStats()
    train, _ = split_records(DataSection(train=[str(path)], on_bad_record="skip"), seed=0, stats=stats)
    assert len(train) == 1 and stats.skipped == 4 and stats.sources[0]["skipped"] == 4
    assert stats.bad[0] == f"{path}:2: missing field 'output'; format 'alpaca' needs instruction, output"


def test_chat_without_template_is_a_clear_error(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(DataError, match="data.template"):
        tokenize(CHAT, "chat", tok)


def test_recipe_data_keys_are_checked(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "a", "a": "b"}\n')

    def recipe(data: str):
        path = tmp_path / "r.yaml"
        path.write_text(f"model:\n  name_or_path: {tmp_path}\ndata:\n{data}")
        return load_recipe(path)

    with pytest.raises(RecipeError, match="'question' is not a field of format 'completion'"):
        recipe(f"  train: {tmp_path}/d.jsonl\n  format: completion\n  fields: {{question: q}}\n")
    with pytest.raises(RecipeError, match="Did you mean 'chatml'"):
        recipe(f"  train: {tmp_path}/d.jsonl\n  template: chatlm\n")
    with pytest.raises(RecipeError, match=r"r.yaml:5: data.datasets.0.path: pattern .* matches no"):
        recipe(f"  datasets:\n    - path: {tmp_path}/*.parquet\n")
    legacy = recipe(f"  train: {tmp_path}/d.jsonl\n  chat_template: '{{{{ messages }}}}'\n")  # older key name
    assert legacy.data.template == "{{ messages }}" and legacy.data.chat_template == "{{ messages }}"
    assert recipe(f"  train: {tmp_path}/d.jsonl\n  template: chatml\n").data.chat_template.startswith("{% for")
