"""KTO: the paper's loss on unpaired feedback, its KL reference point from mismatched pairs, on one loop."""

import json

import pytest
import torch

from conftest import feedback_rows, recipe_file, task_data, training_model, write_jsonl  # noqa: F401
from finetune.data import IGNORE, Collator, Feedback, FeedbackCollator
from finetune.objectives.kto import KTO
from finetune.recipe.schema import Recipe
from test_preference import example, plain_logp
from test_training import adapter, flat, metrics, runner, stop_after_save, train


def recipe_for(model_dir, **kto) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"], "format": "feedback"},
        "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False, "objective": "kto"}, "kto": kto,
    })


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny 4-bit model with LoRA B randomised, so that the policy differs from the reference."""
    m = training_model(recipe_for(tiny_model_dir))
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return m


def answers(vocab: int, n: int, seed: int = 0) -> list[dict]:
    """n feedback examples of random tokens, prompts and answers of different lengths, labels alternating."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (4 + 3 * i,), generator=g).tolist()
        answer = torch.randint(3, vocab, (5 + 2 * (i % 3),), generator=g).tolist()
        out.append({**example(prompt, answer), "desirable": i % 3 != 1})
    return out


def collate(data: Feedback, idx, padding_free=False) -> dict:
    return FeedbackCollator(Collator(pad_id=0, padding_free=padding_free))([data[i] for i in idx])


def step_batches(objective, model, batches):
    """What the loop does for one step on one process: rollout (z0 over the step), then each micro batch."""
    class Acc:
        device = torch.device("cpu")

        @staticmethod
        def reduce(t, op):
            return t

    class Run:
        accelerator, pass_model = Acc(), None

    run = Run()
    run.model = model
    return objective.rollout(run, batches)


def test_kto_loss_is_the_paper_formula(model, tiny_model_dir):
    beta, wd, wu = 0.3, 1.0, 1.5
    objective = KTO(recipe_for(tiny_model_dir, beta=beta, desirable_weight=wd, undesirable_weight=wu))
    data = Feedback(answers(model.config.vocab_size, 5, seed=1), max_length=64)
    with torch.no_grad():
        (batch,) = step_batches(objective, model, [collate(data, range(5))])
        out = objective(model, batch)
        policy = torch.stack([plain_logp(model, data[i]) for i in range(5)])
        kl_policy = torch.stack([plain_logp(model, data[i]["kl"]) for i in range(5)])
        with model.disable_adapter():
            ref = torch.stack([plain_logp(model, data[i]) for i in range(5)])
            kl_ref = torch.stack([plain_logp(model, data[i]["kl"]) for i in range(5)])
    z0 = (kl_policy - kl_ref).mean().clamp(min=0)
    h = policy - ref
    d = torch.tensor([ex["desirable"] for ex in data.examples])
    expected = torch.where(d, wd * (1 - torch.sigmoid(beta * (h - z0))), wu * (1 - torch.sigmoid(beta * (z0 - h))))
    assert z0.item() > 1  # a real reference point (it is clamped at 0)
    assert out.total.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert out.metrics["kl"].item() / 5 == pytest.approx(z0.item(), rel=1e-5)
    # h = policy - ref cancels two log-probabilities of |policy| ~ tens: float32 leaves ~1e-7 of that magnitude,
    # which a relative tolerance on a near-zero h would not allow (it failed after other modules' float work)
    tol = 1e-6 * policy.abs().max().item()
    assert out.metrics["rewards/desirable"].item() / 5 == pytest.approx((beta * h[d]).mean().item(), rel=1e-4, abs=tol)
    assert out.metrics["rewards/undesirable"].item() / 5 == pytest.approx((beta * h[~d]).mean().item(), rel=1e-4,
                                                                           abs=tol)
    assert objective.units(batch) == 5


def test_kl_pairs_are_each_prompt_with_the_previous_answer():
    exs = [{**example([10 + i, 11 + i], [20 + i, 21 + i]), "desirable": True} for i in range(3)]
    data = Feedback(exs, max_length=64)
    assert data[0]["kl"]["input_ids"] == [10, 11, 22, 23]  # the first takes the last one's answer
    assert data[2]["kl"]["input_ids"] == [12, 13, 21, 22]
    assert data[2]["kl"]["labels"] == [IGNORE, IGNORE, 21, 22]
    assert Feedback(exs, max_length=3)[1]["kl"]["input_ids"] == [11, 12, 20]  # cut to max_length


def test_accumulation_and_padding_do_not_change_the_step(model, tiny_model_dir):
    """1 x 4 = 4 x 1 = padding-free: z0 is the step's, each answer's loss its own."""
    objective = KTO(recipe_for(tiny_model_dir))
    data = Feedback(answers(model.config.vocab_size, 4, seed=2), max_length=64)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for b in step_batches(objective, model, micro_batches):
            out = objective(model, b)
            (out.total / 4).backward()
            total += out.total.item()
        return total, [p.grad.clone() for p in trainable]

    one = grads([collate(data, range(4))])
    four = grads([collate(data, [i]) for i in range(4)])
    free = grads([collate(data, range(4), padding_free=True)])
    for other in (four, free):
        assert other[0] == pytest.approx(one[0], rel=1e-5)
        for a, b in zip(one[1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------ data and the CLI


@pytest.fixture
def kto_data(tmp_path):
    return task_data(tmp_path, "kto")


def kto_recipe(tmp_path, model_dir, data_dir, name="kto", kto=None, **training):
    return recipe_file(tmp_path, model_dir, data_dir, name, "kto", lora={"dropout": 0.0}, sections={"kto": kto or {}},
                       **training)


def test_kto_trains_through_the_cli_from_one_half(tmp_path, tiny_model_dir, kto_data):
    result = train(kto_recipe(tmp_path, tiny_model_dir, kto_data, max_steps=4, eval_steps=4))
    assert result.exit_code == 0, result.output
    rows = [m for m in metrics(tmp_path / "runs" / "kto") if "loss" in m]
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # LoRA B = 0: h = z0 = 0, 1 - sigmoid(0)
    assert rows[0]["kl"] == rows[0]["rewards/desirable"] == rows[0]["rewards/undesirable"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margin"] > 0
    evals = [m for m in metrics(tmp_path / "runs" / "kto") if "eval_loss" in m]
    assert evals and {"eval_kl", "eval_rewards/desirable", "eval_rewards/undesirable"} <= evals[-1].keys()
    assert "objective kto" in flat(result.output).replace("objectivekto", "objective kto")


def test_kto_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_model_dir, kto_data, monkeypatch):
    straight = kto_recipe(tmp_path / "a", tiny_model_dir, kto_data, max_steps=4)
    assert train(straight).exit_code == 0
    resumed = kto_recipe(tmp_path / "b", tiny_model_dir, kto_data, max_steps=4, save_steps=2)
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code != 0
    assert train(resumed, "--resume").exit_code == 0
    a, b = tmp_path / "a" / "runs" / "kto", tmp_path / "b" / "runs" / "kto"
    assert [r["loss"] for r in metrics(a) if "loss" in r] == [r["loss"] for r in metrics(b) if "loss" in r]
    assert [r["kl"] for r in metrics(a) if "loss" in r] == [r["kl"] for r in metrics(b) if "loss" in r]
    wa, wb = adapter(a / "checkpoint-final"), adapter(b / "checkpoint-final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_precomputed_reference_gives_the_same_training(tmp_path, tiny_model_dir, kto_data):
    runs = {}
    for pre in (False, True):
        path = kto_recipe(tmp_path / str(pre), tiny_model_dir, kto_data, kto={"precompute_reference": pre},
                          max_steps=3, eval_steps=3)
        assert train(path).exit_code == 0
        runs[pre] = metrics(tmp_path / str(pre) / "runs" / "kto")
    for a, b in zip(runs[False], runs[True]):
        for k in ("loss", "kl", "eval_loss", "eval_kl"):
            if k in a:
                # kl is a mean of differences of summed log-probabilities (magnitude 10-30 here): float32 holds
                # those to ~2e-6 (one ulp at 16), and the precomputed pass batches them otherwise, so a kl of 0
                # may come out as an ulp or two; abs 1e-5, while nonzero values are compared at rel 1e-4
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("objective,fmt,key", [
    ("kto", "preference", "set data.format to feedback"),
    ("dpo", "feedback", "set data.format to preference"),
    ("sft", "feedback", "set training.objective to one of kto"),
])
def test_objective_and_data_must_match(tmp_path, tiny_model_dir, kto_data, objective, fmt, key):
    path = kto_recipe(tmp_path, tiny_model_dir, kto_data)
    body = json.loads(path.read_text())
    body["data"]["format"], body["training"]["objective"] = fmt, objective
    path.write_text(json.dumps(body))
    result = train(path)
    assert result.exit_code == 2 and key in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_bad_feedback_records_are_named_with_file_and_line(tmp_path, tiny_model_dir, kto_data):
    rows = feedback_rows(6)
    rows[2]["label"] = "maybe"
    del rows[4]["label"]
    write_jsonl(kto_data / "train.jsonl", rows)
    result = train(kto_recipe(tmp_path, tiny_model_dir, kto_data))
    text = " ".join(result.output.split()).replace(str(kto_data) + "/", "")
    assert result.exit_code == 2
    assert "train.jsonl:3: 'label' must be true (a desirable answer) or false (undesirable), got 'maybe'" in text
    assert "train.jsonl:5: missing field 'label'" in text


def test_eval_reports_kto_metrics_and_the_checkpoint_is_a_plain_peft_adapter(tmp_path, tiny_model_dir, kto_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.cli import app

    recipe = kto_recipe(tmp_path, tiny_model_dir, kto_data, max_steps=3)
    assert train(recipe).exit_code == 0
    out, checkpoint = tmp_path / "eval.json", tmp_path / "runs" / "kto" / "checkpoint-final"
    result = runner.invoke(app, ["eval", str(recipe), "--adapter", str(checkpoint), "--compare", "--json", str(out)])
    assert result.exit_code == 0, result.output
    models = json.loads(out.read_text())["models"]
    base, tuned = models["base"]["metrics"], models["adapter"]["metrics"]
    assert base["loss"] == pytest.approx(0.5, abs=1e-6) and base["kl"] == 0.0  # the base is its own reference
    assert tuned["loss"] != base["loss"] and {"kl", "rewards/desirable", "rewards/undesirable"} <= tuned.keys()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in plain.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kto", "simpo", "reward"])
def test_two_processes_give_the_same_losses_as_one(tmp_path, tiny_model_dir, objective):
    """2 processes x 2 micro batches = 1 process x 4: the loss of a step is the mean over all its examples, and
    KTO's z0 the step's, over every process (the reference and KL forwards included)."""
    import sys

    from test_distributed import launch, losses

    task_data(tmp_path, objective, train=32)
    paths = {name: recipe_file(tmp_path, tiny_model_dir, tmp_path, name, objective, quantization={"load_in_4bit": True},
                               lora={"dropout": 0.0, "target_modules": "all-linear"}, learning_rate=5e-3, max_steps=3,
                               eval_steps=3, save_steps=3, gradient_accumulation_steps=accumulation)
             for name, accumulation in (("one", 4), ("two", 2))}
    result = runner.invoke(app_(), ["train", str(paths["one"])])
    assert result.exit_code == 0, result.output
    launch([sys.executable, "-m", "finetune", "train", str(paths["two"]), "--nproc", "2"], cwd=tmp_path)
    a, b = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    if objective == "kto":
        kl = [[m["kl"] for m in metrics(tmp_path / "runs" / n) if "loss" in m] for n in ("one", "two")]
        assert kl[0] == pytest.approx(kl[1], abs=1e-5) and kl[0][-1] > 0


def app_():
    from finetune.cli import app

    return app


def test_eval_of_any_model_on_feedback_data_is_kto(tmp_path, tiny_model_dir, kto_data):
    from finetune.cli import app

    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(kto_data / "eval.jsonl"),
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    model = json.loads(out.read_text())["models"]["model"]["metrics"]
    assert model["loss"] == pytest.approx(0.5, abs=1e-7) and model["kl"] == 0.0  # its own reference
