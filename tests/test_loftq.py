"""LoftQ on a 4-bit base (`lora.init: loftq`, `lora.loftq_iter`; finetune/model/loftq.py) on the tiny model.

At initialisation the adapter fits the quantization error: the step-0 model is closer to the full-precision
model than QLoRA's (B = 0) start. With loftq_iter >= 2 the run writes the LoftQ base and every checkpoint names
it, so a killed and resumed run is bit-identical, plain PEFT over that base (quantized by transformers itself)
gives the logits finetune's loaders give, `finetune eval` with the user's recipe finds that base (its eval loss
is training's), and merge reproduces base + adapter. Refused combinations are recipe errors naming the key.
"""

import json
import shutil

import bitsandbytes.nn as bnb_nn
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from typer.testing import CliRunner

from finetune.cli import app
from finetune.recipe.file import load_recipe

from conftest import training_model, write_jsonl
from test_training import assert_same_adapter, losses, make_recipe, metrics, stop_after_save, train

runner = CliRunner()
STEPS = 3
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
QUANT = {"load_in_4bit": True, "compute_dtype": "float32", "double_quant": True}  # float equalities

from test_training import one_thread  # noqa: E402,F401  (autouse: one thread for tiny matmuls)


@pytest.fixture(scope="module")
def data(tmp_path_factory, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("loftq_data")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows[:20])
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[40:44])
    return tmp


def recipe_file(tmp, model_dir, data_dir, name="run", lora=None, quantization=None, extra=None, **training):
    path = make_recipe(tmp, model_dir, data_dir, name=name, quantization={**QUANT, **(quantization or {})},
                       max_steps=STEPS, **training)
    body = json.loads(path.read_text())
    body["lora"] = {**LORA, **(lora or {})}
    body.update(extra or {})
    path.write_text(json.dumps(body))
    return path


def straight_and_resumed(tmp, make):
    """(straight run dir, resumed run dir): `make(dir, **training)` -> recipe path; the second run is killed right
    after checkpoint-2 and resumed."""
    straight = make(tmp / "a")
    assert (result := train(straight)).exit_code == 0, result.output
    resumed = make(tmp / "b", save_steps=2)
    with pytest.MonkeyPatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code == 130
    assert (result := train(resumed, "--resume")).exit_code == 0, result.output
    return tmp / "a" / "runs" / "run", tmp / "b" / "runs" / "run"


def probe_logits(model, ids=torch.tensor([[3, 17, 40, 99, 5, 61, 7, 23]])):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_loftq_init_starts_closer_to_the_full_precision_model(tmp_path, tiny_model_dir, data):
    """Step 0, one alternating step: ||W - Q - s B A|| < ||W - Q|| and the logits move towards the float model's."""
    from finetune.model import loftq_initialise

    path = recipe_file(tmp_path, tiny_model_dir, data, lora={"init": "loftq"})
    recipe = load_recipe(path)
    qlora = training_model(recipe)  # B = 0: the quantized base itself (loftq maps to PEFT's default init)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gap_qlora = (probe_logits(qlora) - probe_logits(full)).abs().mean()
    errors = loftq_initialise(qlora, recipe)
    gap_loftq = (probe_logits(qlora) - probe_logits(full)).abs().mean()
    assert errors["error_after"] < errors["error_before"]
    assert gap_loftq < gap_qlora


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):
    """loftq_iter 2: one straight run, one killed after step 2 and resumed."""
    tmp = tmp_path_factory.mktemp("loftq_runs")
    return straight_and_resumed(tmp, lambda d, **t: recipe_file(d, tiny_model_dir, data, eval_steps=3,
                                                                lora={"init": "loftq", "loftq_iter": 2}, **t))


def test_resume_is_bit_identical_and_checkpoints_name_the_loftq_base(runs):
    a, b = runs
    assert losses(a) == losses(b) and sorted(losses(a)) == list(range(1, STEPS + 1))
    assert_same_adapter(a / "checkpoint-final", b / "checkpoint-final", atol=0)
    base = a / "loftq_base"
    assert (base / "manifest.json").is_file() and (base / "model.safetensors").is_file()
    ckpt = a / "checkpoint-final"
    record = json.loads((ckpt / "adapter_base.json").read_text())
    assert record["relative_to"] == "loftq_base" and record["base"] == str(base)
    assert load_recipe(ckpt / "recipe.yaml").model.name_or_path == str(base)
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert load_recipe(a / "recipe.yaml").model.name_or_path != str(base)  # the run's own recipe is the user's


def test_plain_peft_eval_and_merge_rebuild_the_trained_model(runs, tiny_model_dir, tmp_path):
    from finetune.merge import merge
    from finetune.model import load_adapters, load_eval_model
    from finetune.recipe import ModelSection

    a, _ = runs
    ckpt, base = a / "checkpoint-final", a / "loftq_base"
    recipe = load_recipe(ckpt / "recipe.yaml")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb,
                                                                           dtype=torch.float32), str(ckpt)).eval()
    ours = load_adapters(load_eval_model(ModelSection(name_or_path=str(base)), recipe.quantization, "cpu"),
                         [str(ckpt)]).eval()
    for module in plain.modules():  # on an AVX512_BF16 CPU bitsandbytes would run its bf16 kernel in eval; finetune
        if isinstance(module, bnb_nn.Linear4bit):  # keeps the float32 path (model/load.py), compared here
            module.support_avx512bf16_for_cpu = False
    assert torch.equal(probe_logits(plain), probe_logits(ours))
    # eval with the user's recipe (the published model) finds the LoftQ base from the checkpoint
    user_recipe = a.parent.parent / "run.yaml"
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(user_recipe), "--adapter", str(ckpt), "--json", str(out)])
    assert result.exit_code == 0, result.output
    logged = [m["eval_loss"] for m in metrics(a) if "eval_loss" in m][-1]
    evaluated = json.loads(out.read_text())["models"]["adapter"]
    assert evaluated["model"] == str(base) and evaluated["metrics"]["loss"] == pytest.approx(logged, abs=1e-5)
    report = merge(str(ckpt), tmp_path / "merged")
    assert report.base_weights == "dequantized" and report.fidelity["dequantized"]["max_abs_logit_diff"] < 1e-4


def test_resume_refuses_a_damaged_loftq_base(runs, tmp_path):
    _, b = runs
    copy = tmp_path / "run"
    shutil.copytree(b, copy)
    (copy / "loftq_base" / "model.safetensors").write_bytes(b"damaged")
    body = json.loads((b.parent.parent / "run.yaml").read_text())
    body["output_dir"] = str(copy)
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(body))
    result = train(path, "--resume-from", str(copy / "checkpoint-2"))
    assert result.exit_code == 2 and "LoftQ base" in result.output, result.output


@pytest.mark.parametrize(("lora", "quantization", "keys"), [
    ({"init": "loftq"}, {"load_in_4bit": False}, ["lora.init", "load_in_4bit"]),
    ({"init": "loftq", "use_dora": True}, {}, ["lora.use_dora", "loftq"]),
    ({"loftq_iter": 3}, {}, ["lora.loftq_iter", "loftq"]),
    ({"init": "loftq", "loftq_iter": 0}, {}, ["lora.loftq_iter"]),
])
def test_refused_loftq_combinations_name_the_key(tmp_path, tiny_model_dir, data, lora, quantization, keys):
    path = recipe_file(tmp_path, tiny_model_dir, data, lora=lora, quantization=quantization)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert all(k in text for k in keys) and "run.yaml:" in text, text


def test_loftq_on_a_gguf_base_is_refused(tmp_path, tiny_model_dir, data):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    path = recipe_file(tmp_path, tiny_model_dir, data, lora={"init": "loftq"}, quantization={"quant_type": "gguf"})
    body = json.loads(path.read_text())
    body["model"]["name_or_path"] = str(gguf)
    path.write_text(json.dumps(body))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "lora.init" in result.output and "gguf" in result.output, result.output
