"""Every PEFT method besides LoRA (adapter.method: ia3, adalora, prompt_tuning, prefix_tuning, p_tuning) on the tiny
model, through the real CLI.

Per method, one module-scoped pair of runs on the NF4 base: a straight run of STEPS steps and the same run killed
after checkpoint-2 and resumed (bit-identical losses and adapter; AdaLoRA re-allocates its ranks at steps 3 and 4,
after that checkpoint, and fixes them at step 4). On those: the loss falls; plain `PeftModel.from_pretrained` over
the published base gives the eval loss training logged; IA3 and AdaLoRA merge within the LoRA tolerance; merge and
export of the virtual-token methods exit 2 and point at chat/eval. The refusals exit 2 before any model loads.
"""

import json
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data import Collator, train_eval_split
from finetune.evaluate import eval_objective
from finetune.recipe.file import load_recipe
from finetune.recipe.schema import QuantizationSection

from conftest import load_base, recipe_file, write_jsonl
from test_training import adapter, losses, metrics, one_thread, stop_after_save, train  # noqa: F401

runner = CliRunner()
STEPS = 5
TOLERANCE = 1e-4  # max |logit difference| of a float32 merge from base + adapter, as for plain LoRA
METHODS = {  # per method: its section and a learning rate at which a few steps visibly train it
    "ia3": ({}, 0.1),
    "adalora": ({"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"], "tinit": 1, "tfinal": 1,
                 "alpha": 8}, 0.05),
    "prompt_tuning": ({"num_virtual_tokens": 4}, 0.1),
    "prefix_tuning": ({"num_virtual_tokens": 4, "projection": True, "encoder_hidden_size": 32}, 0.05),
    "p_tuning": ({"num_virtual_tokens": 4, "encoder_hidden_size": 32}, 0.01),
}
VIRTUAL = {"prompt_tuning", "prefix_tuning", "p_tuning"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("method_data")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows[:20])
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[:6])  # seen rows: the loss there must fall
    return tmp


def method_recipe(tmp, model_dir, data_dir, method, name="run", load_in_4bit=True, **training):
    section, lr = METHODS[method]
    return recipe_file(tmp, model_dir, data_dir, name, method=method, sections={method: section},
                       quantization={"load_in_4bit": load_in_4bit, "compute_dtype": "float32"},
                       **{"max_steps": STEPS, "learning_rate": lr, "warmup_steps": 0, "eval_steps": 1, **training})


@pytest.fixture(scope="module", params=list(METHODS))
def runs(request, tmp_path_factory, tiny_model_dir, data):
    """(method, straight run dir, resumed run dir)."""
    method = request.param
    tmp = tmp_path_factory.mktemp(method)
    assert (result := train(method_recipe(tmp / "a", tiny_model_dir, data, method))).exit_code == 0, result.output
    resumed = method_recipe(tmp / "b", tiny_model_dir, data, method, save_steps=2)
    with pytest.MonkeyPatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code == 130
    assert (result := train(resumed, "--resume")).exit_code == 0, result.output
    return method, tmp / "a" / "runs" / "run", tmp / "b" / "runs" / "run"


def eval_losses(run_dir):
    return {r["step"]: r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r}


def test_training_lowers_the_loss_and_resume_is_bit_identical(runs):
    method, a, b = runs
    evals = eval_losses(a)
    assert sorted(evals) == list(range(1, STEPS + 1))
    assert evals[STEPS] < evals[1] - 0.05, evals
    assert losses(a) == losses(b) and eval_losses(a) == eval_losses(b)
    saved, again = adapter(a / "checkpoint-final"), adapter(b / "checkpoint-final")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    config = json.loads((a / "checkpoint-final" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    if method == "adalora":  # the schedule ran on the real steps and the final ranks are saved
        assert (config["total_step"], config["tinit"], config["tfinal"]) == (STEPS, 1, 1)
        ranks = {k: sum(v) for k, v in config["rank_pattern"].items()}
        assert len(ranks) == 4 and 0 < sum(ranks.values()) <= 2 * 4 < 4 * 4  # target_r x layers of init_r x layers
        step2 = json.loads((b / "checkpoint-2" / "adapter_config.json").read_text())
        assert step2["rank_pattern"] is None  # a step checkpoint keeps every triplet: the model as it trains
        state = torch.load(b / "checkpoint-2" / "training_state.pt", weights_only=True)["method"]
        assert state["rank_pattern"] and set(state["exp_avg_ipt"]) == set(state["ipt"])


def test_plain_peft_reload_gives_the_eval_loss_training_logged(runs, tiny_model_dir):
    method, a, _ = runs
    recipe = load_recipe(a / "recipe.yaml")
    assert recipe.adapter.method == method
    base = load_base(str(tiny_model_dir), QuantizationSection(load_in_4bit=True, compute_dtype="float32"))
    model = PeftModel.from_pretrained(base, str(a / "checkpoint-final")).eval()
    from finetune.model import load_tokenizer

    tok = load_tokenizer(str(a / "checkpoint-final"))
    _, eval_set, _ = train_eval_split(recipe.data, tok, recipe.training.seed)
    dl = torch.utils.data.DataLoader(eval_set, batch_size=4, collate_fn=Collator(tok.pad_token_id))
    with torch.no_grad():
        loss = eval_objective(model, dl)["loss"]
    assert loss == pytest.approx(eval_losses(a)[STEPS], abs=1e-5)
    out = a.parent / f"eval-{method}.json"  # and `finetune eval`, with generation, runs the adapter unmerged
    result = runner.invoke(app, ["eval", str(a.parent.parent / "run.yaml"), "--adapter", str(a / "checkpoint-final"),
                                 "--generate", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())["models"]["adapter"]["metrics"]
    assert measured["loss"] == pytest.approx(loss, abs=1e-5) and "exact_match" in measured


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    method, a, _ = runs
    out = tmp_path_factory.mktemp(f"merged_{method}") / "model"
    return method, runner.invoke(app, ["merge", str(a / "checkpoint-final"), "--out", str(out)]), out


def test_weight_methods_merge_and_virtual_token_methods_are_refused(runs, merged, tiny_model_dir, tmp_path):
    method, a, _ = runs
    _, result, out = merged
    if method in VIRTUAL:
        checkpoint = str(a / "checkpoint-final")
        assert result.exit_code == 2 and not out.exists()
        assert "not a change to any weight" in result.output and f"finetune chat {checkpoint}" in result.output
        for extra in ([], ["--adapter-only"]):
            exported = runner.invoke(app, ["export", checkpoint, "--out", str(tmp_path / "x.gguf"), *extra])
            assert exported.exit_code == 2 and "not a change to any weight" in exported.output, exported.output
        return
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["fidelity"]["dequantized"]["max_abs_logit_diff"] < TOLERANCE
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11], [4, 8, 15, 16, 23, 42, 99, 2]])
    base = load_base(str(tiny_model_dir), QuantizationSection(load_in_4bit=True, compute_dtype="float32"))
    with torch.no_grad():
        mine = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        theirs = PeftModel.from_pretrained(base, str(a / "checkpoint-final")).eval()(ids).logits
    torch.testing.assert_close(mine, theirs, atol=TOLERANCE, rtol=0)
    exported = runner.invoke(app, ["export", str(a / "checkpoint-final"), "--adapter-only",
                                   "--out", str(tmp_path / "x.gguf")])
    assert exported.exit_code == 2 and "export the merged model instead" in exported.output, exported.output


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_on_a_float_base(method, tmp_path, tiny_model_dir, data):
    path = method_recipe(tmp_path, tiny_model_dir, data, method, load_in_4bit=False, max_steps=3, eval_steps=3,
                         eval_generate_steps=3, eval_generate_examples=2, eval_max_new_tokens=4)
    if method == "prompt_tuning":  # the soft prompt starts from a text's embeddings here
        body = json.loads(path.read_text())
        body["prompt_tuning"].update(init="text", init_text="Repeat the word")
        path.write_text(json.dumps(body))
    assert (result := train(path)).exit_code == 0, result.output
    rows = metrics(tmp_path / "runs" / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("eval_exact_match" in r for r in rows)  # generation during training, with the method active


REFUSED = [
    ({"adapter": {"method": "ia3"}, "lora": {"use_dora": True}}, ["lora.use_dora", "adapter.method is ia3", "DoRA"]),
    ({"adapter": {"method": "lora"}, "adalora": {"init_r": 16}}, ["adalora.init_r", "adapter.method is lora"]),
    ({"adapter": {"method": "prompt_tuning"}, "data": {"packing": True}}, ["data.packing", "prompt_tuning"]),
    ({"adapter": {"method": "p_tuning"}, "training": {"padding_free": True}}, ["training.padding_free"]),
    ({"adapter": {"method": "prefix_tuning"}, "training": {"gradient_checkpointing": True}},
     ["training.gradient_checkpointing", "prefix_tuning"]),
    ({"adapter": {"method": "adalora"}, "adalora": {"tinit": 3, "tfinal": 3}}, ["no budget phase", "6 optimizer"]),
    ({"adapter": {"method": "prompt_tuning"}, "prompt_tuning": {"init": "text"}}, ["init_text"]),
    ({"adapter": {"method": "ia3"}, "ia3": {"feedforward_modules": ["up_proj"]}}, ["target_modules"]),
    ({"adapter": {"method": "ia3"}, "training": {"objective": "reward"}, "data": {"format": "preference"}},
     ["adapter.method ia3 cannot train a reward model", "score head"]),
]


@pytest.mark.parametrize("change,expected", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_refused_combinations_exit_2_naming_the_key_before_any_model_loads(change, expected, tmp_path,
                                                                          tiny_model_dir, data, monkeypatch):
    import finetune.model.load

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(finetune.model.load, "load_base_model", no_loading)
    path = method_recipe(tmp_path, tiny_model_dir, data, "ia3", max_steps=6)
    body = json.loads(path.read_text())
    body.pop("ia3")
    body["training"]["gradient_checkpointing"] = False
    for section, values in change.items():
        body[section] = {**body.get(section, {}), **values}
    path.write_text(json.dumps(body))
    for verb in ("validate", "train"):
        result = runner.invoke(app, [verb, str(path)])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert all(e in text for e in expected), text
        assert f"{path}:" in text


def test_a_lora_recipe_is_unchanged_and_another_methods_default_section_is_no_error(tmp_path, tiny_model_dir, data):
    path = method_recipe(tmp_path, tiny_model_dir, data, "ia3")
    body = json.loads(path.read_text())
    body["lora"] = {"r": 16, "alpha": 32}  # the defaults, as recipes/quickstart.yaml writes them
    path.write_text(json.dumps(body))
    recipe = load_recipe(path)
    assert recipe.adapter.method == "ia3"
    saved = recipe.to_yaml()
    assert "ia3:" in saved and "lora:" not in saved and "adalora:" not in saved
    lora = load_recipe(path, ["adapter.method=lora"])
    assert "adapter:" not in lora.to_yaml() and "ia3:" not in lora.to_yaml() and "lora:" in lora.to_yaml()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_give_the_losses_of_one(method, tmp_path, tiny_model_dir, data):
    """DDP (2 CPU processes, gloo) with the same effective batch: the same step losses as 1 process."""
    from test_distributed import launch

    paths = {name: method_recipe(tmp_path, tiny_model_dir, data, method, name=name, micro_batch_size=2,
                                 gradient_accumulation_steps=accumulation)
             for name, accumulation in (("one", 4), ("two", 2))}
    for path in paths.values():  # no dropout: its draws differ between one and two processes
        body = json.loads(path.read_text())
        if method == "adalora":
            body["adalora"]["dropout"] = 0.0
        path.write_text(json.dumps(body))
    assert (result := train(paths["one"])).exit_code == 0, result.output
    launch([sys.executable, "-m", "finetune", "train", str(paths["two"]), "--nproc", "2"], cwd=tmp_path)
    one, two = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert one.keys() == two.keys() == set(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5 * max(1.0, abs(one[step]))), step


@pytest.mark.parametrize("method", list(METHODS))
def test_plan_counts_each_methods_parameters_and_activations(method, tiny_model_dir):
    """The planned trainable parameters are the trained model's, and the activation term (virtual tokens
    included) is within test_plan's 10% of what autograd saves for backward."""
    from conftest import training_model
    from finetune.plan.terms import activation_bytes, meta_model, virtual_tokens
    from finetune.recipe.schema import Recipe
    from test_plan import fp32_placement, saved_activation_bytes

    section, _ = METHODS[method]
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["unused.jsonl"], "max_length": 24},
        "quantization": {"compute_dtype": "float32"}, "adapter": {"method": method}, method: section,
        "training": {"gradient_checkpointing": False, "micro_batch_size": 2, "max_steps": 10},
    })
    model = training_model(recipe)
    planned_model = meta_model(recipe, fp32_placement(recipe))[0]
    planned = sorted(p.shape for p in planned_model.parameters() if p.requires_grad)
    assert planned == sorted(p.shape for p in model.parameters() if p.requires_grad)
    assert planned_model.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    measured = saved_activation_bytes(model)
    seq = 24 + virtual_tokens(recipe)
    assert virtual_tokens(recipe) == (4 if method in ("prompt_tuning", "p_tuning") else 0)
    assert activation_bytes(planned_model, recipe, 2, seq, 4, checkpointing=False) == pytest.approx(measured, rel=0.1)


def objective_recipe(tmp, model_dir, method, objective):
    """A 2-step run of `objective` (dpo, orpo, grpo) with `method` on the NF4 base, from test_preference's pairs or
    test_grpo's prompts."""
    from test_grpo import grpo_recipe, prompt_rows
    from test_preference import pref_recipe, preference_rows

    if objective == "grpo":
        write_jsonl(tmp / "train.jsonl", prompt_rows(8))
        write_jsonl(tmp / "eval.jsonl", prompt_rows(2))
        path = grpo_recipe(tmp, model_dir, tmp, name="run", max_steps=2, grpo={"max_new_tokens": 4})
    else:
        write_jsonl(tmp / "train.jsonl", preference_rows(8))
        write_jsonl(tmp / "eval.jsonl", preference_rows(2))
        path = pref_recipe(tmp, model_dir, tmp, name="run", objective=objective, max_steps=2, eval_steps=2)
    body = json.loads(path.read_text())
    section, lr = METHODS[method]
    section = {**section, "tinit": 0, "tfinal": 0} if method == "adalora" else section  # a budget phase in 2 steps
    body.pop("lora")
    body.update({"adapter": {"method": method}, method: section,
                 "quantization": {"load_in_4bit": True, "compute_dtype": "float32"}})
    body["training"]["learning_rate"] = lr
    path.write_text(json.dumps(body))
    return path


FAST_OBJECTIVES = {("ia3", "dpo"), ("prompt_tuning", "dpo"), ("adalora", "grpo"), ("p_tuning", "grpo"),
                   ("prefix_tuning", "orpo")}


COMBINATIONS = [pytest.param(m, o, marks=() if (m, o) in FAST_OBJECTIVES else pytest.mark.slow, id=f"{m}-{o}")
                for m in METHODS for o in ("dpo", "orpo", "grpo")]


@pytest.mark.parametrize("method,objective", COMBINATIONS)
def test_each_method_trains_with_each_objective(method, objective, tmp_path, tiny_model_dir):
    """Preference and RL objectives: the reference is the base (adapter off; for the virtual-token methods, no
    virtual tokens). A few combinations in the default suite, all of them with -m slow."""
    assert (result := train(objective_recipe(tmp_path, tiny_model_dir, method, objective))).exit_code == 0, \
        result.output
    rows = [r for r in metrics(tmp_path / "runs" / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    identity = method in ("ia3", "adalora")  # these start as the identity: policy = reference at step 1
    if objective == "dpo" and identity:
        assert rows[0]["rewards/margin"] == 0.0 and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    if objective == "grpo" and identity:
        assert rows[0]["kl"] == 0.0


@pytest.mark.parametrize("runs", ["ia3"], indirect=True)
def test_resume_refuses_another_method_or_method_setting(runs, tmp_path):
    import shutil

    _, _, b = runs
    shutil.copytree(b, tmp_path / "runs" / "run")
    body = json.loads((b.parent.parent / "run.yaml").read_text())
    body["output_dir"] = str(tmp_path / "runs" / "run")
    for change, expected in (({"ia3": {"target_modules": ["v_proj"], "feedforward_modules": []}},
                              "the ia3 section changed"),
                             ({"adapter": {"method": "lora"}, "ia3": {}}, "adapter.method changed (ia3 -> lora)")):
        path = tmp_path / "changed.yaml"
        path.write_text(json.dumps({**body, **change}))
        result = train(path, "--resume")
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
