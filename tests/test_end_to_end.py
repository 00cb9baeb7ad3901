"""The real CLI on a 2-layer model: train (4-bit NF4), adapter loading, merge and eval."""

import json

import bitsandbytes as bnb
import pytest
from peft import PeftModel
from typer.testing import CliRunner

from finetune.cli import app
from finetune.recipe.schema import QuantizationSection

from conftest import load_base, recipe_file, write_jsonl

runner = CliRunner()


def make_recipe(tmp_path, model_dir, **training):
    return recipe_file(tmp_path, model_dir, tmp_path, "tiny", data={"max_length": 64},
                       quantization={"load_in_4bit": True, "compute_dtype": "float32"},  # exact equalities
                       lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                       **{"max_steps": 30, "micro_batch_size": 8, "gradient_accumulation_steps": 2,
                          "learning_rate": 5e-3, "logging_steps": 5, "eval_steps": 15, "save_steps": 15,
                          "warmup_steps": 3, "optimizer": "paged_adamw_32bit", "seed": 42, **training})


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("e2e")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows)
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[:16])
    recipe = make_recipe(tmp, tiny_model_dir)
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "recipe": recipe, "dir": tmp / "runs" / "tiny", "output": result.output}


def test_training_lowers_the_loss_and_records_the_run(run):
    lines = [json.loads(x) for x in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"], train
    assert [x["step"] for x in evals] == [15, 30] and evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 1e-6
    assert all(x["tokens_per_s"] > 0 and x["lr"] >= 0 for x in train)
    assert (run["dir"] / "recipe.yaml").exists() and (run["dir"] / "summary.json").exists()
    for ckpt in ("checkpoint-15", "checkpoint-final"):
        files = {p.name for p in (run["dir"] / ckpt).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "recipe.yaml"} <= files
    assert "trainable parameters" in run["output"]


def test_adapter_loads_in_plain_peft_on_nf4_layers(run, tiny_model_dir):
    base = load_base(str(tiny_model_dir), QuantizationSection(), "cpu")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q,k,v,o,gate,up,down in each of the 2 layers; lm_head stays full precision
    assert layers[0].weight.quant_state.quant_type == "nf4"
    model = PeftModel.from_pretrained(base, str(run["dir"] / "checkpoint-final"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init


def test_refuses_to_overwrite_a_finished_run(run):
    before = (run["dir"] / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["train", str(run["recipe"])])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (run["dir"] / "metrics.jsonl").read_text() == before


def test_eval_compare_writes_json(run, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(run["recipe"]), "--adapter", str(run["dir"] / "checkpoint-final"),
                                 "--compare", "--json", str(out), "--generate", "2", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["base", "adapter"]
    metrics = {label: entry["metrics"] for label, entry in report["models"].items()}
    for m in metrics.values():
        assert {"loss", "perplexity", "exact_match", "contains"} <= set(m)
        assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]
    assert report["examples"] == 16 and report["generated"] == 2
    assert "base" in result.output and "adapter" in result.output


def test_merged_model_scores_what_the_trained_adapter_scores(run, tmp_path):
    """merge (dequantized, the default) then eval the merged model at full precision: the same eval loss as the
    4-bit base + adapter that was trained, so the merge is the trained model."""
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(run["dir"] / "checkpoint-final"), "--out", str(merged)])
    assert result.exit_code == 0 and "merge fidelity" in result.output, result.output
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(run["recipe"]), "--model", str(merged), "--json", str(out)])
    assert result.exit_code == 0, result.output
    merged_eval = json.loads(out.read_text())["models"]["model"]
    assert merged_eval["quantization"] == "none"
    trained = json.loads((run["dir"] / "summary.json").read_text())["eval_loss"]
    assert merged_eval["metrics"]["loss"] == pytest.approx(trained, rel=1e-4)
