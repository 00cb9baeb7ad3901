"""Label masking: exactly the response tokens (and the end-of-turn token after each) are trained."""

import json

import pytest
from transformers import AutoTokenizer

from finetune.data import IGNORE, Collator, DataStats, load_records, read_jsonl, tokenize_example
from finetune.errors import DataError
from finetune.model import load_tokenizer
from finetune.recipe import DataSection


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


def tokenize(rec, fmt, tok, train_on="completion", max_length=512):
    return tokenize_example(rec, fmt, tok, train_on, max_length, DataStats())


CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, of course."},
    ]
}


@pytest.mark.parametrize("fixture,eot", [("tiny_tokenizer_dir", "<|im_end|>"), ("tiny_llama3_tokenizer_dir", "<|eot_id|>")])
def test_chat_masks_exactly_every_assistant_turn(request, fixture, eot):
    tok = load_tokenizer(str(request.getfixturevalue(fixture)))
    ex = tokenize(CHAT, "chat", tok)
    assert trained_text(tok, ex) == f"Blue.{eot}Green, of course.{eot}"
    # the full sequence is exactly what the chat template renders
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CHAT["messages"], tokenize=False)


def test_alpaca_through_chat_template(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    rec = {"instruction": "Repeat the word twice.", "input": "cat", "output": "cat cat"}
    ex = tokenize(rec, "alpaca", tok)
    assert trained_text(tok, ex) == "cat cat<|im_end|>"
    assert "<|im_start|>user\nRepeat the word twice.\n\ncat<|im_end|>" in tok.decode(ex["input_ids"])


def test_alpaca_without_chat_template_ends_with_eos(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    tok.chat_template = None
    ex = tokenize({"instruction": "Say hi.", "output": "hi there"}, "alpaca", tok)
    assert trained_text(tok, ex) == "hi there" + tok.eos_token
    assert tok.decode(ex["input_ids"]).startswith("### Instruction:\nSay hi.\n\n### Response:\n")


def test_train_on_all_and_text_format(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    ex = tokenize({"instruction": "Say hi.", "output": "hi"}, "alpaca", tok, train_on="all")
    assert all(lab != IGNORE for lab in ex["labels"])
    ex = tokenize({"text": "plain words"}, "text", tok)
    assert trained_text(tok, ex) == "plain words" + tok.eos_token


def test_eos_label_survives_padding_when_pad_is_eos(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
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
    tok = load_tokenizer(str(tiny_llama3_tokenizer_dir))
    assert tok.pad_token == tok.eos_token


def test_truncation_and_drop_are_counted(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    stats = DataStats()
    rec = {"instruction": "word " * 50, "output": "answer " * 50}
    prompt_len = len(tokenize({"instruction": "word " * 50, "output": "x"}, "alpaca", tok)["input_ids"])
    assert tokenize_example(rec, "alpaca", tok, "completion", prompt_len + 5, stats) is not None
    assert tokenize_example(rec, "alpaca", tok, "completion", 10, stats) is None
    assert (stats.truncated, stats.dropped, stats.examples) == (2, 1, 1)


def test_broken_json_and_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n\n[1, 2]\n'
                    '{"instruction": "a"}\n{"instruction": "a", "output": "  "}\n{"instruction": 3, "output": "b"}\n')
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert f"{path}:2: broken JSON" in str(e.value) and f"{path}:4: expected a JSON object" in str(e.value)
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "a", "output": "  "},
        {"instruction": 3, "output": "b"}, {"messages": []}]) + "\n")
    with pytest.raises(DataError) as e:
        load_records([str(path)], "alpaca")
    msg = str(e.value)
    assert "4 bad record(s)" in msg
    assert f"{path}:2: missing field 'output'" in msg and f"{path}:3: empty 'output'" in msg
    assert f"{path}:4: field 'instruction' must be a string" in msg


def test_chat_without_template_is_a_clear_error(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(DataError, match="data.chat_template"):
        tokenize(CHAT, "chat", tok)


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path, tiny_tokenizer_dir):
    from finetune.data import split_records

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(40)))
    data = DataSection(train=[str(path)], eval_fraction=0.25)
    train, held = split_records(data, seed=1)
    assert len(held) == 10 and len(train) == 30
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert split_records(data, seed=1) == (train, held)
