"""Reward models: a score head on the base, the Bradley-Terry loss, checkpoints plain PEFT loads, GRPO scoring."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.objectives.reward import RewardModel, sequence_scores
from finetune.recipe.schema import Recipe
from conftest import preference_rows, recipe_file, task_data
from test_preference import collate, pairs, pref_data  # noqa: F401
from test_training import adapter, metrics, runner, stop_after_save, train


def recipe_for(model_dir, **reward) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"], "format": "preference"},
        "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False, "objective": "reward"}, "reward": reward,
    })


def reward_training_model(recipe):
    from finetune.model import attach_lora, load_base_model, resolve

    placement = resolve(recipe.quantization)
    base = load_base_model(recipe.model, recipe.quantization, "cpu", placement, head="score")
    return attach_lora(base, recipe, placement)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny 4-bit reward model with LoRA B and the score head randomised."""
    m = reward_training_model(recipe_for(tiny_model_dir))
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    return m


def plain_score(model, ex) -> torch.Tensor:
    """transformers' own pooled output for one unpadded sequence (its last token is never the pad token here)."""
    return model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, 0]


def test_the_head_is_trained_and_zero_at_the_start(tiny_model_dir):
    m = reward_training_model(recipe_for(tiny_model_dir))
    head = [(n, p) for n, p in m.named_parameters() if p.requires_grad and "score" in n]
    assert head and all(torch.count_nonzero(p) == 0 for _, p in head)
    assert any("lora_A" in n for n, p in m.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_bradley_terry_loss_on_the_head_at_the_last_token(model, tiny_model_dir, margin):
    objective = RewardModel(recipe_for(tiny_model_dir, margin=margin))
    ps = pairs(model.config.vocab_size, 3)
    with torch.no_grad():
        out = objective(model, collate(ps))
        r = torch.stack([plain_score(model, x) for p in ps for x in p])
    expected = -F.logsigmoid(r[0::2] - r[1::2] - margin)
    assert out.total.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert out.metrics["rewards/accuracy"].item() == (r[0::2] > r[1::2]).sum().item()
    assert out.metrics["rewards/margin"].item() == pytest.approx((r[0::2] - r[1::2]).sum().item(), rel=1e-4)


def test_scores_do_not_depend_on_padding_or_company_and_accumulation_is_exact(model, tiny_model_dir):
    objective = RewardModel(recipe_for(tiny_model_dir))
    ps = pairs(model.config.vocab_size, 4, seed=2)
    with torch.no_grad():
        alone = torch.cat([sequence_scores(model, collate([p])) for p in ps])
        torch.testing.assert_close(sequence_scores(model, collate(ps)), alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sequence_scores(model, collate(ps, padding_free=True)), alone, rtol=1e-5, atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        for mb in micro_batches:
            (objective(model, collate(mb)).total / len(ps)).backward()
        return [p.grad.clone() for p in trainable]

    for a, b in zip(grads([ps]), grads([[p] for p in ps])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------ the CLI


def reward_recipe(tmp_path, model_dir, data_dir, **training):
    return recipe_file(tmp_path, model_dir, data_dir, "reward", "reward", lora={"dropout": 0.0},
                       quantization={"compute_dtype": "float32"},  # scores compared with plain float32 PEFT
                       **{"learning_rate": 5e-3, **training})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One reward model trained 6 steps, with its recipe and run directory."""
    tmp = task_data(tmp_path_factory.mktemp("reward"), "reward")
    recipe = reward_recipe(tmp, tiny_model_dir, tmp, max_steps=6, eval_steps=3)
    result = train(recipe)
    assert result.exit_code == 0, result.output
    return recipe, tmp / "runs" / "reward"


def test_reward_model_trains_from_log_2_and_learns_to_rank(trained):
    _, run_dir = trained
    rows = [m for m in metrics(run_dir) if "loss" in m]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # a zero head: every reward 0
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == rows[0]["rewards/accuracy"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [m for m in metrics(run_dir) if "eval_loss" in m]
    assert [e["step"] for e in evals] == [3, 6] and evals[-1]["eval_rewards/accuracy"] > 0.5


def test_the_checkpoint_loads_in_plain_transformers_and_peft_with_the_same_scores(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.data import Collator, normalize, tokenize_all
    from finetune.model import load_reward_checkpoint
    from finetune.recipe.schema import DataSection

    _, run_dir = trained
    checkpoint = run_dir / "checkpoint-final"
    tok = AutoTokenizer.from_pretrained(checkpoint)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                              pad_token_id=tok.pad_token_id)
    plain = PeftModel.from_pretrained(base, checkpoint).eval()
    records = [normalize(r, "preference", {}) for r in preference_rows(4)]
    examples, _ = tokenize_all(records, DataSection(train=["x.jsonl"], format="preference", max_length=48), tok)
    ours, _ = load_reward_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        batch = Collator(tok.pad_token_id)(examples)  # transformers pools at the last token that is not padding
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        torch.testing.assert_close(sequence_scores(ours, batch), theirs, rtol=1e-5, atol=1e-5)
    assert theirs.abs().max() > 0


def test_eval_reports_reward_accuracy(trained):
    from finetune.cli import app

    recipe, run_dir = trained
    out = run_dir.parent / "eval.json"
    result = runner.invoke(app, ["eval", str(recipe), "--adapter", str(run_dir / "checkpoint-final"), "--compare",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    models = json.loads(out.read_text())["models"]
    base, tuned = models["base"]["metrics"], models["adapter"]["metrics"]
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-7) and base["rewards/accuracy"] == 0.0  # zero head
    last_eval = [m for m in metrics(run_dir) if "eval_loss" in m][-1]
    assert tuned["rewards/accuracy"] == pytest.approx(last_eval["eval_rewards/accuracy"], abs=1e-9)
    assert tuned["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-5)


def test_reward_model_resume_is_bit_exact(tmp_path, tiny_model_dir, pref_data, monkeypatch):  # noqa: F811
    straight = reward_recipe(tmp_path / "a", tiny_model_dir, pref_data, max_steps=4)
    assert train(straight).exit_code == 0
    resumed = reward_recipe(tmp_path / "b", tiny_model_dir, pref_data, max_steps=4, save_steps=2)
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code != 0
    assert train(resumed, "--resume").exit_code == 0
    a, b = tmp_path / "a" / "runs" / "reward", tmp_path / "b" / "runs" / "reward"
    assert [r["loss"] for r in metrics(a) if "loss" in r] == [r["loss"] for r in metrics(b) if "loss" in r]
    wa, wb = adapter(a / "checkpoint-final"), adapter(b / "checkpoint-final")
    assert any("score" in k for k in wa) and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------ as GRPO's reward


def test_grpo_reward_model_scores_prompt_and_completion_like_plain_peft(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.objectives.reward import reward_model

    _, run_dir = trained
    checkpoint = run_dir / "checkpoint-final"
    tok = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Repeat the word twice. cat"}], tokenize=False,
                                     add_generation_prompt=True)
    completions = ["cat cat", "dog", "cat"]
    scores = reward_model([prompt] * 3, completions, ["cat cat"] * 3, path=str(checkpoint), batch_size=2)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                              pad_token_id=tok.pad_token_id)
    plain = PeftModel.from_pretrained(base, checkpoint).eval()
    with torch.no_grad():
        expected = [plain(input_ids=torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]
                                                  + tok(c + "<|im_end|>\n", add_special_tokens=False)["input_ids"]])
                          ).logits[0, 0].item() for c in completions]
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_a_grpo_reward_model_must_be_a_reward_checkpoint(tmp_path, tiny_model_dir, trained):
    from test_grpo import grpo_recipe

    task_data(tmp_path, "grpo", train=4, eval=2)
    for reward, message in [({"function": "reward_model"}, "reward reward_model needs path"),
                            ({"function": "reward_model", "path": str(tmp_path)}, "is not an adapter directory")]:
        result = train(grpo_recipe(tmp_path, tiny_model_dir, tmp_path, rewards=[reward]))
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    _, run_dir = trained
    result = train(grpo_recipe(tmp_path, tiny_model_dir, tmp_path, max_steps=1,
                               rewards=[{"function": "reward_model", "path": str(run_dir / "checkpoint-final")}]))
    assert result.exit_code == 0, result.output
    assert "reward/reward_model" in [m for m in metrics(tmp_path / "runs" / "grpo") if "loss" in m][0]


def test_plan_counts_both_answers_of_a_pair_and_a_score_head_instead_of_logits(tiny_model_dir):
    from finetune.plan.memory import plan

    def terms(objective, fmt):
        r = Recipe.model_validate({"model": {"name_or_path": str(tiny_model_dir)},
                                   "data": {"train": ["x.jsonl"], "format": fmt},
                                   "quantization": {"compute_dtype": "float32"}, "training": {"objective": objective, "micro_batch_size": 3}})
        return {t.name: t.bytes for t in plan(r, device="cuda", seq_length=32, device_memory=2**30).terms}

    sft, kto, dpo, reward = terms("sft", "alpaca"), terms("kto", "feedback"), terms("dpo", "preference"), \
        terms("reward", "preference")
    assert kto["activations"] == sft["activations"]  # KTO's KL and reference forwards hold nothing for backward
    assert dpo["activations"] == reward["activations"] > sft["activations"]  # 2 x 3 sequences vs 3
    assert reward["loss (labelled positions, chunked)"] == 6 * 32 * 4 + 6 * 32 * 64 * 4  # scores + hidden states
    assert reward["LoRA parameters"] == dpo["LoRA parameters"] + 4 * 64  # + the trained score head (64 -> 1)


def test_chat_merge_and_export_refuse_a_reward_model(trained, tmp_path):
    from finetune.cli import app

    _, run_dir = trained
    checkpoint = str(run_dir / "checkpoint-final")
    for args in (["chat", checkpoint, "--prompt", "hi"], ["merge", checkpoint, "--out", str(tmp_path / "m")],
                 ["export", checkpoint, "--out", str(tmp_path / "x.gguf")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "is a reward model's adapter (a score head, no LM head)" in " ".join(result.output.split())
    assert not (tmp_path / "m").exists() and not (tmp_path / "x.gguf").exists()
