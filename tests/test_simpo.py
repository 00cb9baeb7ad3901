"""SimPO: the reference-free, length-normalised margin loss of the paper, on DPO's pair layout and loop."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.objectives.simpo import SimPO
from conftest import recipe_file
from test_preference import collate, pairs, plain_terms, pref_data, recipe_for  # noqa: F401
from test_training import adapter, metrics, runner, stop_after_save, train


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from test_preference import training_model

    m = training_model(recipe_for(tiny_model_dir, training={"objective": "simpo"}))
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return m


@pytest.mark.parametrize("section,gamma", [({"beta": 2.0, "gamma_beta_ratio": 0.25}, 0.5),
                                           ({"beta": 1.5, "gamma": 0.3, "label_smoothing": 0.1}, 0.3)])
def test_simpo_loss_is_the_paper_formula(model, tiny_model_dir, section, gamma):
    objective = SimPO(recipe_for(tiny_model_dir, training={"objective": "simpo"}, simpo=section))
    ps = pairs(model.config.vocab_size, 3)
    with torch.no_grad():
        out = objective(model, collate(ps))
    p, _, n = plain_terms(model, ps)
    beta, eps = section["beta"], section.get("label_smoothing", 0.0)
    r = beta * p / n
    z = r[0::2] - r[1::2] - gamma
    expected = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    assert out.total.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert out.metrics["rewards/margin"].item() == pytest.approx((r[0::2] - r[1::2]).sum().item(), rel=1e-4)
    assert out.metrics["rewards/accuracy"].item() == (r[0::2] > r[1::2]).sum().item()


def test_simpo_needs_no_reference_forward(model, tiny_model_dir, monkeypatch):
    objective = SimPO(recipe_for(tiny_model_dir, training={"objective": "simpo"}))
    monkeypatch.setattr(type(model), "disable_adapter", lambda self: pytest.fail("SimPO ran a reference forward"))
    ps = pairs(model.config.vocab_size, 2)
    alone = sum(objective(model, collate([p])).total.item() for p in ps)
    together = objective(model, collate(ps, padding_free=True)).total.item()
    assert together == pytest.approx(alone, rel=1e-5)


def test_gradient_accumulation_1x4_equals_4x1(model, tiny_model_dir):
    objective = SimPO(recipe_for(tiny_model_dir, training={"objective": "simpo"}))
    ps = pairs(model.config.vocab_size, 4, seed=4)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        for mb in micro_batches:
            (objective(model, collate(mb)).total / len(ps)).backward()
        return [p.grad.clone() for p in trainable]

    for a, b in zip(grads([ps]), grads([[p] for p in ps])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def simpo_recipe(tmp_path, model_dir, data_dir, simpo=None, **training):
    return recipe_file(tmp_path, model_dir, data_dir, "simpo", "simpo", sections={"simpo": simpo or {}}, **training)


def test_simpo_trains_through_the_cli_and_lowers_the_loss(tmp_path, tiny_model_dir, pref_data):  # noqa: F811
    result = train(simpo_recipe(tmp_path, tiny_model_dir, pref_data, {"beta": 2.0, "gamma": 1.0}, max_steps=4,
                                eval_steps=4))
    assert result.exit_code == 0, result.output
    rows = [m for m in metrics(tmp_path / "runs" / "simpo") if "loss" in m]
    first = rows[0]
    # The mean of softplus(gamma - margin) over pairs is at least softplus of the mean (Jensen), equal if all agree.
    assert first["loss"] >= math.log1p(math.exp(1.0 - first["rewards/margin"])) > 0
    assert rows[-1]["loss"] < first["loss"]
    evals = [m for m in metrics(tmp_path / "runs" / "simpo") if "eval_loss" in m]
    assert evals and "eval_rewards/accuracy" in evals[-1]


def test_simpo_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, pref_data, monkeypatch):  # noqa: F811
    straight = simpo_recipe(tmp_path / "a", tiny_model_dir, pref_data, max_steps=4)
    assert train(straight).exit_code == 0
    resumed = simpo_recipe(tmp_path / "b", tiny_model_dir, pref_data, max_steps=4, save_steps=2)
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code != 0
    assert train(resumed, "--resume").exit_code == 0
    a, b = tmp_path / "a" / "runs" / "simpo", tmp_path / "b" / "runs" / "simpo"
    assert [r["loss"] for r in metrics(a) if "loss" in r] == [r["loss"] for r in metrics(b) if "loss" in r]
    wa, wb = adapter(a / "checkpoint-final"), adapter(b / "checkpoint-final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gamma_and_its_ratio_are_one_or_the_other(tmp_path, tiny_model_dir, pref_data):  # noqa: F811
    result = train(simpo_recipe(tmp_path, tiny_model_dir, pref_data, {"gamma": 1.0, "gamma_beta_ratio": 0.5}))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "simpo" in text and "give either gamma or gamma_beta_ratio, not both" in text


def test_eval_reports_simpo_metrics(tmp_path, tiny_model_dir, pref_data):  # noqa: F811
    from finetune.cli import app

    recipe = simpo_recipe(tmp_path, tiny_model_dir, pref_data, max_steps=4)
    assert train(recipe).exit_code == 0
    out, checkpoint = tmp_path / "eval.json", tmp_path / "runs" / "simpo" / "checkpoint-final"
    result = runner.invoke(app, ["eval", str(recipe), "--adapter", str(checkpoint), "--compare", "--json", str(out)])
    assert result.exit_code == 0, result.output
    models = json.loads(out.read_text())["models"]
    base, tuned = models["base"]["metrics"], models["adapter"]["metrics"]
    assert tuned["loss"] < base["loss"] and tuned["rewards/margin"] > base["rewards/margin"]
    last_eval = [m for m in metrics(tmp_path / "runs" / "simpo") if "eval_loss" in m][-1]
    assert tuned["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-6)
    assert tuned["rewards/margin"] == pytest.approx(last_eval["eval_rewards/margin"], rel=1e-5)
