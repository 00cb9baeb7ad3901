"""AdaMix (`adapter.method: adamix`, the `adamix` section; finetune/model/adamix.py, finetune/objectives/adamix.py)
on the tiny 4-bit model.

Routing: in training each forward of a layer uses one A expert and one B expert drawn at random (only those get
gradients); in evaluation the layer uses the experts' average, deterministically. A killed and resumed run is
bit-identical; the checkpoint is a plain LoRA holding the experts' averages, which plain PEFT loads into the
trained model's evaluation logits and merge reproduces; the consistency term is logged; refusals name the key.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.recipe.file import load_recipe

from conftest import training_model
from test_loftq import data, probe_logits, recipe_file, straight_and_resumed  # noqa: F401  (data: a fixture)
from test_training import adapter, assert_same_adapter, losses, metrics

runner = CliRunner()
STEPS = 3
ADAMIX = {"adapter": {"method": "adamix"}, "adamix": {"num_adapters": 3, "consistency_weight": 1.0}}

from test_training import one_thread  # noqa: E402,F401  (autouse: one thread for tiny matmuls)


def adamix_recipe(tmp, model_dir, data_dir, extra=None, **training):
    return recipe_file(tmp, model_dir, data_dir, extra={**ADAMIX, **(extra or {})}, **training)


def experts(model):
    return {n: p for n, p in model.named_parameters() if "variant_parameters.adamix" in n}


def test_training_draws_one_expert_pair_per_forward_and_evaluation_averages(tmp_path, tiny_model_dir, data):
    recipe = load_recipe(adamix_recipe(tmp_path, tiny_model_dir, data))
    model = training_model(recipe)
    with torch.no_grad():  # experts that differ (PEFT initialises B to 0: give every expert its own values)
        for p in experts(model).values():
            p.normal_(0, 0.5)
    model.train()
    torch.manual_seed(0)
    model(input_ids=torch.tensor([[3, 17, 40, 99]])).logits.sum().backward()
    graded = [n for n, p in experts(model).items() if p.grad is not None]
    layers = 2 * 2  # 2 decoder layers x (q_proj, v_proj)
    assert len(experts(model)) == layers * 2 * 3 and len(graded) == layers * 2  # one A and one B per layer
    draws = {tuple(probe_logits(model)[0, -1, :4].tolist()) for _ in range(6)}
    assert len(draws) > 1  # stochastic routing
    model.eval()
    averaged = probe_logits(model)
    assert torch.equal(averaged, probe_logits(model))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):  # noqa: F811
    tmp = tmp_path_factory.mktemp("adamix_runs")
    return straight_and_resumed(tmp, lambda d, **t: adamix_recipe(d, tiny_model_dir, data, **t))


def test_resume_is_bit_identical_and_consistency_is_logged(runs):
    a, b = runs
    assert losses(a) == losses(b) and sorted(losses(a)) == list(range(1, STEPS + 1))
    assert_same_adapter(a / "checkpoint-final", b / "checkpoint-final", atol=0)
    logged = [m["consistency"] for m in metrics(a) if "consistency" in m]
    assert len(logged) == STEPS and logged[-1] > 0  # the two routes disagree once the experts differ


def test_the_checkpoint_is_the_experts_average_as_a_plain_lora(runs, tmp_path):
    from finetune.merge import merge
    from finetune.model import MethodRuntime, load_adapters, load_eval_model
    from finetune.train.checkpoint import load_training_state

    a, _ = runs
    ckpt = a / "checkpoint-final"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    saved = adapter(ckpt)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    recipe = load_recipe(ckpt / "recipe.yaml")
    trained = training_model(recipe)
    MethodRuntime(trained, recipe).load_state_dict(load_training_state(ckpt)[1]["method"])
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    mean = torch.stack([p for n, p in experts(trained).items() if "adamix_A" in n and "layers__1__self_attn__v_proj"
                        in n]).mean(0)
    assert torch.equal(saved[name], mean.detach())
    plain = load_adapters(load_eval_model(recipe.model, recipe.quantization, "cpu"), [str(ckpt)]).eval()
    torch.testing.assert_close(probe_logits(plain), probe_logits(trained.eval()), atol=1e-5, rtol=0)
    report = merge(str(ckpt), tmp_path / "merged")
    assert report.fidelity["dequantized"]["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize(("extra", "keys"), [
    ({"adamix": {"num_adapters": 1}}, ["adamix.num_adapters"]),
    ({"lora": {"use_dora": True}}, ["lora.use_dora", "adamix"]),
    ({"training": {"objective": "dpo"}, "data": {"format": "preference"}}, ["adamix.consistency_weight", "dpo"]),
    ({"adapter": {"method": "lora"}, "adamix": {"num_adapters": 2}}, ["adamix.num_adapters", "adapter.method"]),
])
def test_refused_adamix_settings_name_the_key(tmp_path, tiny_model_dir, data, extra, keys):  # noqa: F811
    path = adamix_recipe(tmp_path, tiny_model_dir, data)
    body = json.loads(path.read_text())
    for section, values in extra.items():
        body[section] = {**body.get(section, {}), **values}
    path.write_text(json.dumps(body))
    result = runner.invoke(app, ["validate", str(path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and all(k in text for k in keys), text
