"""`finetune eval`: answer extraction, generation metrics, several adapters on one base, the JSON schema."""

import importlib.util
import json
import math

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import finetune.evaluate.measure as ev
import finetune.generate.decode
from finetune.cli import app
from finetune.data import Record
from finetune.errors import DataError
from finetune.evaluate.measure import GenerationOptions, evaluate, last_number, make_extractor, normalize_number, score_example

from conftest import write_jsonl
from test_merge import make_adapter

runner = CliRunner()


# ------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("She paid $1,250.50 in total.", "1250.5"),
    ("The temperature fell to -7 degrees.", "-7"),
    ("So the answer is 3.0.", "3"),
    ("First 5, then 10, so 15 apples", "15"),
    ("#### 42\nI hope that helps, 7 times over.", "42"),  # the number after #### wins over later ones
    ("It costs 0.25 each", "0.25"),
    ("10-3=7", "7"),
    ("a list: 1,2,3", "3"),  # not a thousands separator
    ("no digits here", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_normalize_number_gives_one_spelling_per_value():
    assert {normalize_number(x) for x in ["1000", "1,000", "1000.00", "01000"]} == {"1000"}
    assert normalize_number("-0.50") == "-0.5"


def test_regex_extractor_takes_the_first_group_or_the_whole_match():
    assert make_extractor(r"regex:answer: (\w+)")("The answer: Paris. Not answer: Rome") == "Paris"
    assert make_extractor(r"regex:[A-D]\)")("I pick C) because") == "C)"
    assert make_extractor(r"regex:answer: (\w+)")("no idea") is None
    with pytest.raises(DataError, match="Bad answer extractor"):
        make_extractor("regex:(unclosed")
    with pytest.raises(DataError, match="Unknown answer extractor"):
        make_extractor("first_word")


def test_score_example():
    gsm = "He has 3 + 4 = 7 apples.\n#### 7"
    assert score_example("3 and 4 make 7", gsm, "last_number")["correct"]
    wrong = score_example("7 apples plus 2 is 9", gsm, "last_number")
    assert not wrong["correct"] and wrong["contains"] and wrong["extracted"] == "9"
    assert not score_example("17", gsm, "last_number")["contains"]  # numbers, not substrings
    plain = score_example("  Paris ", "Paris", None)
    assert plain["correct"] and score_example("It is paris.", "Paris", None) == {
        "extracted": "It is paris.", "expected": "Paris", "correct": False, "contains": True}


def test_generation_metrics_aggregate_the_scores(tiny_model_dir, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [Record("alpaca", {"instruction": f"q{i}", "input": "", "output": f"#### {i}"}, f"x:{i}")
               for i in range(4)]
    records.append(Record("text", {"text": "raw text has no reference"}, "x:5"))
    predictions = ["0", "the answer is 1", "9", "3, or maybe 2"]
    monkeypatch.setattr(finetune.generate.decode, "generate", lambda model, tok, prompts, options: predictions)
    metrics, samples = ev.generation_metrics(None, tok, records, GenerationOptions(extractor="last_number"))
    assert metrics["exact_match"] == 0.5 and metrics["contains"] == 0.75
    assert [s["correct"] for s in samples] == [True, True, False, False]
    assert samples[1]["reference"] == "#### 1" and "q1" in samples[1]["prompt"]
    assert ("chrf" in metrics) == (importlib.util.find_spec("sacrebleu") is not None)


# ------------------------------------------------------------- generation


def test_batched_generation_matches_one_at_a_time(tiny_model_dir):
    """Left padding must not change a greedy completion."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(t)["input_ids"] for t in ["Say hi.", "A cat and a dog sat under the tree", "Name a color"]]
    opts = GenerationOptions(max_new_tokens=6, batch_size=3)
    batched = ev.generate(model, tok, prompts, opts)
    alone = [ev.generate(model, tok, [p], GenerationOptions(max_new_tokens=6))[0] for p in prompts]
    assert batched == alone and all(batched)


def test_sampling_is_seeded(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok("Name a color")["input_ids"]] * 4
    hot = GenerationOptions(max_new_tokens=8, temperature=1.5, seed=3)
    first, again = ev.generate(model, tok, prompts, hot), ev.generate(model, tok, prompts, hot)
    assert first == again and len(set(first)) > 1  # reproducible, and really sampling


# --------------------------------------------------------- full evaluation


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("eval")
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[:6])
    recipe = tmp / "r.yaml"
    recipe.write_text(json.dumps({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(tmp / "eval.jsonl"), "eval": str(tmp / "eval.jsonl"), "format": "alpaca",
                 "max_length": 64},
        "training": {"micro_batch_size": 4},
    }))
    return {"tmp": tmp, "recipe": recipe, "a": make_adapter(tmp / "a", tiny_model_dir, seed=0),
            "b": make_adapter(tmp / "b", tiny_model_dir, seed=1)}


def test_cli_json_schema_and_samples(setup):
    tmp = setup["tmp"]
    result = runner.invoke(app, [
        "eval", str(setup["recipe"]), "--adapter", str(setup["a"]), "--adapter", str(setup["b"]), "--compare",
        "--generate", "-1", "--max-new-tokens", "4", "--extract", "last_number",
        "--json", str(tmp / "out.json"), "--samples", str(tmp / "samples.jsonl"),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp / "out.json").read_text())
    assert set(report) == {"schema", "data", "examples", "generated", "generation", "models"}
    assert report["schema"] == "finetune.eval/1" and report["examples"] == report["generated"] == 6
    assert report["generation"] == {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "batch_size": 8,
                                    "seed": 0, "extractor": "last_number"}
    assert list(report["models"]) == ["base", "a", "b"]
    for label, entry in report["models"].items():
        assert set(entry) == {"label", "model", "adapter", "quantization", "metrics", "seconds"}
        assert entry["quantization"] == "4-bit nf4" and entry["label"] == label
        m = entry["metrics"]
        assert {"loss", "perplexity", "exact_match", "contains"} <= set(m)
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6) and 0 <= m["exact_match"] <= 1
        assert set(entry["seconds"]) == {"loss", "generate"}
    assert report["models"]["base"]["adapter"] is None and report["models"]["a"]["adapter"] == str(setup["a"])
    lines = [json.loads(x) for x in (tmp / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 6
    assert {"model", "index", "prompt", "reference", "prediction", "extracted", "expected", "correct"} <= set(lines[0])
    for label in report["models"]:  # the per-example verdicts add up to the reported exact match
        mine = [x["correct"] for x in lines if x["model"] == label]
        assert sum(mine) / 6 == report["models"][label]["metrics"]["exact_match"]
    assert "exact_match" in result.output and "b" in result.output


def test_adapters_on_one_base_score_as_if_loaded_alone(setup, tiny_model_dir):
    """Switching adapters on a shared base (and disabling them for `base`) gives each one's own numbers."""
    from finetune.recipe.file import load_recipe

    recipe = load_recipe(setup["recipe"])
    together = evaluate(recipe, adapters=[setup["a"], setup["b"]], compare=True)
    alone_b = evaluate(recipe, adapters=[setup["b"]])
    base = evaluate(recipe)
    loss = {k: v["metrics"]["loss"] for k, v in together.models.items()}
    assert loss["b"] == pytest.approx(alone_b.models["adapter"]["metrics"]["loss"], rel=1e-6)
    assert loss["base"] == pytest.approx(base.models["base"]["metrics"]["loss"], rel=1e-6)
    assert len(set(loss.values())) == 3


def test_eval_a_model_on_a_data_file_without_recipe(setup, tiny_model_dir):
    """--model + --data: full precision (no recipe says otherwise), format guessed from the records."""
    rep = evaluate(model=str(tiny_model_dir), data=str(setup["tmp"] / "eval.jsonl"), limit=2, generate_n=1,
                   options=GenerationOptions(max_new_tokens=3))
    entry = rep.models["model"]
    assert rep.examples == 2 and rep.generated == 1 and entry["quantization"] == "none"
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not isinstance(full, PeftModel) and math.isfinite(entry["metrics"]["loss"])


def write_gguf(model_dir, path):
    """The tiny Llama as an F32 GGUF file, laid out as llama.cpp's converter writes it (q/k rows permuted)."""
    import gguf

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    added = {t["id"]: t["content"] for t in spec["added_tokens"]}
    tokens = [added.get(i, t) for t, i in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed (extra: gguf)")
def test_a_gguf_file_scores_like_the_model_it_was_converted_from(setup, tiny_model_dir):
    path = setup["tmp"] / "tiny.gguf"
    write_gguf(tiny_model_dir, path)
    data = str(setup["tmp"] / "eval.jsonl")
    opts = GenerationOptions(max_new_tokens=4)
    from_gguf = evaluate(model=str(path), data=data, generate_n=2, options=opts).models["model"]
    original = evaluate(model=str(tiny_model_dir), data=data, generate_n=2, options=opts).models["model"]
    assert from_gguf["metrics"]["loss"] == pytest.approx(original["metrics"]["loss"], rel=1e-5)
    assert from_gguf["quantization"] == "none"


def test_bad_extractor_fails_before_loading_a_model(setup):
    result = runner.invoke(app, ["eval", str(setup["recipe"]), "--generate", "1", "--extract", "regex:("])
    assert result.exit_code == 2 and "Bad answer extractor" in result.output


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (extra: harness)")
def test_harness_runs_a_local_task_on_the_in_memory_adapter(setup, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "toy.jsonl", [{"question": f"Repeat {w}", "answer": w} for w in ["cat", "dog", "sun"]])
    (tasks / "toy.yaml").write_text(
        "task: finetune_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'toy.jsonl'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  max_gen_toks: 4\n  until: ['\\n']\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    from finetune.recipe.file import load_recipe

    rep = evaluate(load_recipe(setup["recipe"]), adapters=[setup["a"]], harness=["finetune_toy"],
                   harness_include=str(tasks))
    metrics = rep.models["adapter"]["metrics"]
    assert 0 <= metrics["finetune_toy/exact_match"] <= 1
