"""Every source shape (jsonl, json, csv, parquet, directory, glob, hub id), mixing, held-out splits and the
tokenized-data cache."""

import csv
import json
import time

import pytest

from finetune.data import read as D
from finetune.data import DataStats, load_source, prepare_data, split_records
from finetune.errors import DataError
from finetune.model.load import load_tokenizer
from finetune.recipe.schema import DataSection, DatasetSpec

from conftest import write_jsonl

ROWS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)]
FIELDS = {"prompt": "q", "completion": "a"}


def spec(path, **kw) -> DatasetSpec:
    return DatasetSpec(path=str(path), format="completion", fields=FIELDS, **kw)


def prompts(records) -> list[str]:
    return [r.data["prompt"] for r in records]


def write_all_formats(tmp_path):
    """The same six rows as .jsonl, .json (an array spread over lines), .csv and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp_path.mkdir(exist_ok=True)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["q", "a"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")


def test_every_file_type_reads_the_same_records_with_locations(tmp_path):
    write_all_formats(tmp_path)
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        records, bad = load_source(spec(tmp_path / name))
        assert prompts(records) == [r["q"] for r in ROWS] and not bad, name
    where = {name: [r.where for r in load_source(spec(tmp_path / name))[0]][:2]
             for name in ("d.jsonl", "d.json", "d.csv", "d.parquet")}
    assert where["d.jsonl"] == [f"{tmp_path}/d.jsonl:1", f"{tmp_path}/d.jsonl:2"]
    assert where["d.json"] == [f"{tmp_path}/d.json:2", f"{tmp_path}/d.json:6"]  # line where each object starts
    assert where["d.csv"] == [f"{tmp_path}/d.csv:2", f"{tmp_path}/d.csv:3"]  # line 1 is the header
    assert where["d.parquet"] == [f"{tmp_path}/d.parquet row 1", f"{tmp_path}/d.parquet row 2"]


def test_csv_multiline_cells_and_json_lines_named_json(tmp_path):
    (tmp_path / "m.csv").write_text('q,a\n"two\nlines",x\nsecond,\n')
    records, bad = load_source(spec(tmp_path / "m.csv"))
    assert prompts(records) == ["two\nlines"] and bad == [f"{tmp_path}/m.csv:4: empty 'a'"]
    (tmp_path / "l.json").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    assert prompts(load_source(spec(tmp_path / "l.json"))[0]) == ["question 0", "question 1"]
    (tmp_path / "b.json").write_text('[\n  {"q": "x", "a": "y"},\n  {"q": "x" "a"}\n]')
    assert load_source(spec(tmp_path / "b.json"))[1] == [f"{tmp_path}/b.json:3: broken JSON (Expecting ',' "
                                                         "delimiter at column 13)"]


def test_directory_and_glob(tmp_path):
    write_all_formats(tmp_path / "all")
    (tmp_path / "all" / "notes.txt").write_text("not data")
    assert len(load_source(spec(tmp_path / "all"))[0]) == 4 * len(ROWS)
    assert len(load_source(spec(tmp_path / "all" / "*.js*"))[0]) == 2 * len(ROWS)
    with pytest.raises(DataError, match="names no"):
        load_source(spec(tmp_path / "all" / "*.nothing"))


def test_hub_dataset_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(D, "_hub_revision", lambda path, revision: "abc123")
    records, _ = load_source(spec("someorg/qa", name="main", split="train[:6]", revision="v1"))
    assert calls == [("someorg/qa", "main", "train[:6]", "v1")]
    assert prompts(records) == [r["q"] for r in ROWS] and records[0].where == "someorg/qa[train[:6]] row 1"


def test_unreachable_hub_fails_fast_with_a_clear_error(monkeypatch):
    """Without network, datasets.load_dataset would retry for ~30 s; one short probe answers instead."""
    import datasets
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "dataset_info", no_network)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset must not be called"))
    D._hub_revision.cache_clear()
    started = time.perf_counter()
    with pytest.raises(DataError) as e:
        load_source(spec("someorg/unreachable"))
    assert time.perf_counter() - started < 5
    assert "Cannot reach the Hugging Face hub" in str(e.value) and "HF_HUB_OFFLINE=1" in str(e.value)
    D._hub_revision.cache_clear()


def test_mixing_weights_sample_counts_and_held_out_split(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": f"a{i}", "a": "x"} for i in range(20)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    data = DataSection(datasets=[
        {"path": str(tmp_path / "a.jsonl"), "format": "completion", "fields": FIELDS, "weight": 0.5},
        {"path": str(tmp_path / "b.jsonl"), "format": "text", "num_samples": 25},
    ], eval_fraction=0.2)
    stats = DataStats()
    train, held = split_records(data, seed=3, stats=stats)
    a_train = [r for r in train if r.fmt == "completion"]
    b_train = [r for r in train if r.fmt == "text"]
    assert len(a_train) == 8 and len(set(prompts(a_train))) == 8  # half of the 16 left after holding out 4
    assert len(b_train) == 25 and len({r.data["text"] for r in b_train}) == 8  # 8 repeated to 25
    assert len(held) == 4 + 2
    held_keys = {r.where for r in held}
    assert not held_keys & {r.where for r in train}  # nothing held out is trained on
    assert [s["train"] for s in stats.sources] == [8, 25] and [s["eval"] for s in stats.sources] == [4, 2]
    again, held_again = split_records(data, seed=3)
    assert [r.where for r in again] == [r.where for r in train]
    assert [r.where for r in held_again] == [r.where for r in held]


def test_eval_path_is_read_like_the_training_data(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    write_jsonl(tmp_path / "e.jsonl", ROWS[:2])
    data = DataSection(datasets=[spec(tmp_path / "t.jsonl").model_dump()], eval=str(tmp_path / "e.jsonl"))
    assert data.eval_datasets[0].format == "completion" and data.eval_datasets[0].fields == FIELDS
    train, held = split_records(data, seed=0)
    assert len(train) == 6 and prompts(held) == ["question 0", "question 1"]


def test_tokenized_data_is_cached_by_fingerprint(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, ROWS)
    data = DataSection(train=[str(path)], format="completion", fields=FIELDS, eval_fraction=0.34)
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    first = prepare_data(data, tok, seed=1, cache=tmp_path / "cache")
    second = prepare_data(data, tok, seed=1, cache=tmp_path / "cache")
    assert not first.cache_hit and second.cache_hit and first.key == second.key
    assert second.train == first.train and second.eval == first.eval and len(first.eval) == 2
    assert second.stats.lengths == first.stats.lengths and second.stats.sources == first.stats.sources
    write_jsonl(path, ROWS[:-1] + [{"q": "changed", "a": "answer"}])  # same size, other content
    assert not prepare_data(data, tok, seed=1, cache=tmp_path / "cache").cache_hit
    other = data.model_copy(update={"max_length": 64})
    assert not prepare_data(other, tok, seed=1, cache=tmp_path / "cache").cache_hit
    assert not prepare_data(data, tok, seed=2, cache=tmp_path / "cache").cache_hit  # another held-out split
