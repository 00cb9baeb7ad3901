"""Objectives plug into one loop: a toy objective defined here trains through the real CLI."""

import json

import pytest
import torch

from finetune.objectives.base import SFT, LossSum
from finetune.recipe.schema import OBJECTIVES

from conftest import write_jsonl
from test_training import adapter, make_recipe, metrics, train


class DoubledSFT(SFT):
    """SFT's loss times two, reporting a per-unit metric: the same direction, twice the first gradient."""

    metrics = ("scale",)

    def __call__(self, model, batch):
        out = super().__call__(model, batch)
        return LossSum(2 * out.total, {"scale": torch.tensor(2.0 * self.units(batch))})


@pytest.fixture
def data(tmp_path, toy_alpaca_rows):
    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows[:16])
    write_jsonl(tmp_path / "eval.jsonl", toy_alpaca_rows[40:44])
    return tmp_path


def test_a_new_objective_is_one_class_and_one_recipe_value(tmp_path, tiny_model_dir, data, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "doubled_sft", f"{DoubledSFT.__module__}:DoubledSFT")
    runs = {}
    for objective in ("sft", "doubled_sft"):
        recipe = make_recipe(tmp_path, tiny_model_dir, data, name=objective, objective=objective, max_steps=2,
                             max_grad_norm=0, eval_steps=1)
        result = train(recipe)
        assert result.exit_code == 0, result.output
        runs[objective] = tmp_path / "runs" / objective
    sft, doubled = ([m for m in metrics(runs[o]) if "loss" in m] for o in ("sft", "doubled_sft"))
    # Step 1 starts from the same model (LoRA B = 0): exactly twice the loss and twice the gradient.
    assert doubled[0]["loss"] == pytest.approx(2 * sft[0]["loss"], rel=1e-6)
    assert doubled[0]["grad_norm"] == pytest.approx(2 * sft[0]["grad_norm"], rel=1e-6)
    assert doubled[0]["scale"] == doubled[1]["scale"] == 2.0  # metrics are averaged over the step's units
    # AdamW is invariant to the loss scale (up to eps): the same direction, so nearly the same adapter.
    assert doubled[1]["loss"] == pytest.approx(2 * sft[1]["loss"], rel=1e-4)
    a, b = adapter(runs["sft"] / "checkpoint-final"), adapter(runs["doubled_sft"] / "checkpoint-final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    evals = [m for m in metrics(runs["doubled_sft"]) if "eval_loss" in m]
    assert [m["eval_scale"] for m in evals] == [2.0, 2.0]  # eval reports the objective's metrics too


def test_an_unknown_objective_is_a_recipe_error_naming_the_choices(tmp_path, tiny_model_dir, data):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, objective="stf")
    result = train(recipe)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "training.objective: unknown objective; expected one of sft, dpo, orpo, grpo, kto, simpo, reward. Did you mean 'sft'?" in text
    assert f"{recipe}:" in text and "Traceback" not in text
    assert not (tmp_path / "runs").exists()  # nothing written
    assert json.loads(recipe.read_text())["training"]["objective"] == "stf"
