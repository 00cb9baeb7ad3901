"""DPO and ORPO: the losses of the paper formulas, computed without wasted logits, on one loop."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.data import IGNORE, Collator, flatten
from finetune.objectives.base import DPO, ORPO
from finetune.recipe.schema import Recipe


def recipe_for(model_dir, **sections) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"], "format": "preference"},
        "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False, "objective": "dpo"}, **sections,
    })


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny 4-bit model with LoRA B randomised, so that the policy differs from the reference."""
    recipe = recipe_for(tiny_model_dir)
    m = training_model(recipe)
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return m


def example(prompt: list[int], answer: list[int]) -> dict:
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def pairs(vocab: int, n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """n (chosen, rejected) pairs of random tokens with prompts and answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (4 + 3 * i,), generator=g).tolist()
        chosen = torch.randint(3, vocab, (5 + i,), generator=g).tolist()
        rejected = torch.randint(3, vocab, (7 - i % 3,), generator=g).tolist()
        out.append((example(prompt, chosen), example(prompt, rejected)))
    return out


def collate(ps, padding_free=False) -> dict:
    return Collator(pad_id=0, padding_free=padding_free)([x for p in ps for x in p])


def plain_logp(model, ex: dict) -> torch.Tensor:
    """Summed log-probability of the answer tokens from the model's full logits, one unpadded sequence."""
    ids = torch.tensor([ex["input_ids"]])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    labels = torch.tensor(ex["labels"][1:])
    keep = labels != IGNORE
    return F.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep][:, None]).sum()


def plain_terms(model, ps):
    """(policy logp, reference logp, answer length) per sequence, from independent plain forward passes."""
    with torch.no_grad():
        policy = torch.stack([plain_logp(model, x) for p in ps for x in p])
        with model.disable_adapter():
            ref = torch.stack([plain_logp(model, x) for p in ps for x in p])
    lengths = torch.tensor([float(sum(t != IGNORE for t in x["labels"][1:])) for p in ps for x in p])
    return policy, ref, lengths


@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_is_the_paper_formula(model, tiny_model_dir, loss, smoothing):
    beta = 0.3
    objective = DPO(recipe_for(tiny_model_dir, dpo={"beta": beta, "loss": loss, "label_smoothing": smoothing}))
    ps = pairs(model.config.vocab_size, 3)
    with torch.no_grad():
        out = objective(model, collate(ps))
    p, q, n = plain_terms(model, ps)
    if loss == "ipo":
        p, q = p / n, q / n
    m = (p[0::2] - p[1::2]) - (q[0::2] - q[1::2])
    expected = (m - 1 / (2 * beta)) ** 2 if loss == "ipo" else \
        -(1 - smoothing) * F.logsigmoid(beta * m) - smoothing * F.logsigmoid(-beta * m)
    assert out.total.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    chosen, rejected = beta * (p[0::2] - q[0::2]), beta * (p[1::2] - q[1::2])
    # The margin is a small difference of large summed log-probabilities, computed by the objective on the padded
    # batch and by plain_terms one unpadded sequence at a time: float32 rounding of those sums (a few ulps each, more
    # where the CPU's GEMM blocks differently) bounds the agreement, not a fixed 1e-6.
    rounding = 4 * torch.finfo(torch.float32).eps * beta * (p.abs() + q.abs()).sum().item()
    assert out.metrics["rewards/margin"].item() == pytest.approx((chosen - rejected).sum().item(), abs=rounding)
    assert out.metrics["rewards/accuracy"].item() == (chosen > rejected).sum().item()
    assert objective.units(collate(ps)) == 3


def test_orpo_loss_is_the_paper_formula(model, tiny_model_dir):
    objective = ORPO(recipe_for(tiny_model_dir, training={"objective": "orpo"}, orpo={"lambda": 0.5}))
    ps = pairs(model.config.vocab_size, 3, seed=1)
    with torch.no_grad():
        out = objective(model, collate(ps))
    p, _, n = plain_terms(model, ps)
    mean = (p / n).double()
    log_odds = mean - torch.log(1 - torch.exp(mean))
    expected = -mean[0::2] - 0.5 * F.logsigmoid(log_odds[0::2] - log_odds[1::2])
    assert out.total.item() == pytest.approx(expected.sum().item(), rel=1e-5)


@pytest.mark.parametrize("objective_class", [DPO, ORPO])
def test_a_pairs_loss_does_not_depend_on_padding_or_batch_company(model, tiny_model_dir, objective_class):
    objective = objective_class(recipe_for(tiny_model_dir))
    ps = pairs(model.config.vocab_size, 4, seed=2)
    with torch.no_grad():
        alone = torch.stack([objective(model, collate([p])).total for p in ps])
        together = objective(model, collate(ps)).total  # padded to the longest of the four
        padding_free = objective(model, collate(ps, padding_free=True)).total  # one row, no padding
    assert together.item() == pytest.approx(alone.sum().item(), rel=1e-5)
    assert padding_free.item() == pytest.approx(alone.sum().item(), rel=1e-5)
    assert objective.units(collate(ps, padding_free=True)) == 4


def test_at_the_start_the_policy_is_the_reference_and_dpo_loss_is_log_2(tiny_model_dir):
    recipe = recipe_for(tiny_model_dir)
    fresh = training_model(recipe)  # LoRA B = 0
    ps = pairs(fresh.config.vocab_size, 3, seed=3)
    out = DPO(recipe)(fresh, collate(ps))
    assert out.total.item() / 3 == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/chosen"].item() == out.metrics["rewards/rejected"].item() == 0.0


def test_gradient_accumulation_1x4_equals_4x1(model, tiny_model_dir):
    """The loop divides each micro batch's summed loss by the step's pairs: the same gradient either way."""
    objective = DPO(recipe_for(tiny_model_dir))
    ps = pairs(model.config.vocab_size, 4, seed=4)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        for mb in micro_batches:
            (objective(model, collate(mb)).total / len(ps)).backward()
        return [p.grad.clone() for p in trainable]

    one, four = grads([ps]), grads([[p] for p in ps])
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_flatten_keeps_pairs_in_order():
    ps = [(example([5, 6], [7]), example([5, 6], [8, 9]))]
    row = flatten([x for p in ps for x in p])
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]


# ------------------------------------------------------------------------ data and the CLI

from conftest import preference_rows, recipe_file, task_data, training_model, write_jsonl  # noqa: E402, F401
from test_training import adapter, flat, metrics, stop_after_save, train  # noqa: E402


@pytest.fixture
def pref_data(tmp_path):
    return task_data(tmp_path, "dpo")


def pref_recipe(tmp_path, model_dir, data_dir, name="dpo", objective="dpo", **training):
    return recipe_file(tmp_path, model_dir, data_dir, name, objective, **training)


def test_the_three_record_shapes_render_the_same_tokens(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from finetune.data import normalize, tokenize_all
    from finetune.recipe.schema import DataSection

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = preference_rows(3)
    rows[1]["prompt"][0]["content"] = rows[2]["chosen"][0]["content"] = rows[0]["prompt"]
    rows[1]["chosen"][0]["content"] = rows[2]["chosen"][1]["content"] = rows[0]["chosen"]
    rows[1]["rejected"][0]["content"] = rows[2]["rejected"][1]["content"] = rows[0]["rejected"]
    rows[2]["rejected"][0] = rows[2]["chosen"][0]
    records = [normalize(r, "preference", {}) for r in rows]
    examples, stats = tokenize_all(records, DataSection(train=["x.jsonl"], format="preference"), tok)
    assert len(examples) == 6 and stats.examples == 6
    assert examples[0]["input_ids"] == examples[2]["input_ids"] == examples[4]["input_ids"]
    assert examples[1]["labels"] == examples[3]["labels"] == examples[5]["labels"]
    trained = tok.decode([t for t in examples[0]["labels"] if t != IGNORE])
    assert trained == rows[0]["chosen"] + "<|im_end|>"  # only the answer and its end of turn


def test_dpo_trains_through_the_cli_from_log_2(tmp_path, tiny_model_dir, pref_data):
    result = train(pref_recipe(tmp_path, tiny_model_dir, pref_data, max_steps=3, eval_steps=2))
    assert result.exit_code == 0, result.output
    rows = [m for m in metrics(tmp_path / "runs" / "dpo") if "loss" in m]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy = reference
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == 0.0
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected"} <= rows[-1].keys()
    evals = [m for m in metrics(tmp_path / "runs" / "dpo") if "eval_loss" in m]
    assert evals and "eval_rewards/accuracy" in evals[-1]
    assert "objective dpo" in flat(result.output).replace("objectivedpo", "objective dpo")


def test_orpo_trains_through_the_cli(tmp_path, tiny_model_dir, pref_data):
    result = train(pref_recipe(tmp_path, tiny_model_dir, pref_data, name="orpo", objective="orpo", max_steps=2))
    assert result.exit_code == 0, result.output
    rows = [m for m in metrics(tmp_path / "runs" / "orpo") if "loss" in m]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and "log_odds_ratio" in r for r in rows)


def test_dpo_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, pref_data, monkeypatch):
    straight = pref_recipe(tmp_path / "a", tiny_model_dir, pref_data, max_steps=4)
    assert train(straight).exit_code == 0
    resumed = pref_recipe(tmp_path / "b", tiny_model_dir, pref_data, max_steps=4, save_steps=2)
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code != 0
    assert train(resumed, "--resume").exit_code == 0
    a, b = tmp_path / "a" / "runs" / "dpo", tmp_path / "b" / "runs" / "dpo"
    assert [r["loss"] for r in metrics(a) if "loss" in r] == [r["loss"] for r in metrics(b) if "loss" in r]
    wa, wb = adapter(a / "checkpoint-final"), adapter(b / "checkpoint-final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("objective,fmt,key", [("dpo", "alpaca", "set data.format to preference"),
                                               ("sft", "preference", "training.objective to one of dpo, orpo")])
def test_objective_and_data_must_match(tmp_path, tiny_model_dir, pref_data, objective, fmt, key):
    path = pref_recipe(tmp_path, tiny_model_dir, pref_data, objective=objective)
    body = json.loads(path.read_text())
    body["data"]["format"] = fmt
    path.write_text(json.dumps(body))
    result = train(path)
    assert result.exit_code == 2 and key in " ".join(result.output.split())
    assert "training.objective" in result.output and "data.format" in result.output


def test_bad_preference_records_are_named_with_file_and_line(tmp_path, tiny_model_dir, pref_data):
    rows = preference_rows(6)
    rows[2] = {"prompt": "p", "chosen": "same", "rejected": "same"}
    rows[4] = {"prompt": "p", "chosen": "a"}
    write_jsonl(pref_data / "train.jsonl", rows)
    result = train(pref_recipe(tmp_path, tiny_model_dir, pref_data))
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "train.jsonl:3: 'chosen' and 'rejected' are the same answer" in text.replace(str(pref_data) + "/", "")
    assert "train.jsonl:5: missing field 'rejected'" in text.replace(str(pref_data) + "/", "")


def test_eval_reports_reward_accuracy_and_margin_for_base_and_adapter(tmp_path, tiny_model_dir, pref_data):
    from test_training import runner

    from finetune.cli import app

    recipe = pref_recipe(tmp_path, tiny_model_dir, pref_data, max_steps=3)
    assert train(recipe).exit_code == 0
    out = tmp_path / "eval.json"
    checkpoint = tmp_path / "runs" / "dpo" / "checkpoint-final"
    result = runner.invoke(app, ["eval", str(recipe), "--adapter", str(checkpoint), "--compare", "--json", str(out)])
    assert result.exit_code == 0, result.output
    models = json.loads(out.read_text())["models"]
    base, tuned = models["base"]["metrics"], next(m["metrics"] for k, m in models.items() if k != "base")
    assert base["rewards/margin"] == 0.0 and base["rewards/accuracy"] == 0.0  # the base is its own reference
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert tuned["loss"] != base["loss"] and "perplexity" not in tuned
    last_eval = [m for m in metrics(tmp_path / "runs" / "dpo") if "eval_loss" in m][-1]
    assert tuned["rewards/accuracy"] == pytest.approx(last_eval["eval_rewards/accuracy"], abs=1e-6)


def test_precomputed_reference_gives_the_same_training(tmp_path, tiny_model_dir, pref_data):
    runs = {}
    for pre in (False, True):
        path = pref_recipe(tmp_path / str(pre), tiny_model_dir, pref_data, max_steps=3, eval_steps=3)
        body = json.loads(path.read_text())
        body["dpo"] = {"precompute_reference": pre}
        path.write_text(json.dumps(body))
        assert train(path).exit_code == 0
        runs[pre] = metrics(tmp_path / str(pre) / "runs" / "dpo")
    for a, b in zip(runs[False], runs[True]):
        for k in ("loss", "eval_loss", "rewards/margin", "eval_rewards/margin"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
