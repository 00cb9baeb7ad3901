"""GRPO: advantages, rewards, the clipped-ratio loss against plain policy gradients, and training through the CLI."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from finetune.errors import RecipeError
from finetune.objectives.grpo import GRPO, group_advantages
from finetune.recipe.schema import Recipe
from finetune.objectives.rewards import RewardError, load_rewards, score

from conftest import TOY_WORDS, prompt_rows, recipe_file, task_data, training_model  # noqa: F401
from test_training import adapter, metrics, stop_after_save, train

EXACT = [{"function": "exact_match"}]


def recipe_for(model_dir, grpo=None, rewards=EXACT, **sections) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"]},
        "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False, "objective": "grpo"},
        "grpo": {"group_size": 3, "max_new_tokens": 6, **(grpo or {})}, "rewards": rewards, **sections,
    })


# ------------------------------------------------------------------------------------------ advantages


def test_groups_with_equal_rewards_get_zero_advantage_and_groups_are_normalised():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 0.5, 2.0, 0.1, 0.1, 0.1, 0.1])
    for scale in (True, False):
        a = group_advantages(rewards, 4, scale).view(-1, 4)
        assert torch.equal(a[0], torch.zeros(4)) and torch.equal(a[2], torch.zeros(4))  # exactly 0
        assert a[1].mean().abs() < 1e-6
    a = group_advantages(rewards, 4, scale=True).view(-1, 4)
    assert a[1].std().item() == pytest.approx(1.0, rel=1e-3)  # grpo/token: std 1 (up to the 1e-4 guard)
    b = group_advantages(rewards, 4, scale=False).view(-1, 4)  # dr_grpo: no std division
    torch.testing.assert_close(b[1], rewards[4:8] - rewards[4:8].mean())


# ------------------------------------------------------------------------------------------ rewards


def test_builtin_rewards_score_like_eval():
    specs = Recipe.model_validate({
        "model": {"name_or_path": "x/y"}, "data": {"train": ["u.jsonl"]}, "training": {"objective": "grpo"},
        "rewards": [{"function": "exact_match", "extract": "last_number", "weight": 2},
                    {"function": "format", "pattern": r"regex:.*#### -?\d+"},
                    {"function": "contains", "text": "so"}, {"function": "length", "limit": 10}],
    }).rewards
    rewards = load_rewards(specs)
    totals, each = score(rewards, ["q", "q"], ["so 3 + 4 = 7 #### 7", "8"], ["#### 7", "#### 7"])
    assert each == {"exact_match": [1.0, 0.0], "format": [1.0, 0.0], "contains": [1.0, 0.0],
                    "length": [-0.9, 0.0]}
    assert totals == pytest.approx([2 + 1 + 1 - 0.9, 0.0])


def test_a_reward_in_a_module_is_found_and_a_broken_one_is_named(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, references, scale=1.0):\n"
        "    return [scale / (1 + len(c)) for c in completions]\n"
        "def broken(prompts, completions, references):\n"
        "    return [1 / (len(c) - 3) for c in completions]\n"
        "def not_a_number(prompts, completions, references):\n"
        "    return [None if c == 'b' else 1.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = recipe_for("x/y", rewards=[{"function": "my_rewards:brevity", "scale": 2.0}])
    (r,) = load_rewards(recipe.rewards)
    assert score([r], ["p", "p"], ["a", "abc"], ["", ""])[0] == [1.0, 0.5]
    by_path = recipe_for("x/y", rewards=[{"function": f"{tmp_path}/my_rewards.py:brevity"}])
    (file_reward,) = load_rewards(by_path.rewards)
    assert score([file_reward], ["p"], ["a"], [""])[0] == [0.5]
    broken, bad = load_rewards(recipe_for("x/y", rewards=[{"function": "my_rewards:broken"},
                                                          {"function": "my_rewards:not_a_number"}]).rewards)
    with pytest.raises(RewardError, match=r"'my_rewards:broken' \(rewards\[0\]\) raised ZeroDivisionError.*"
                                          r"example 1 of the step \(prompt: 'q1'; completion: 'abc'\)"):
        score([broken], ["q0", "q1"], ["ab", "abc"], ["", ""])
    with pytest.raises(RewardError, match=r"not_a_number.*returned None, not a finite number on example 1"):
        score([bad], ["q0", "q1"], ["a", "b"], ["", ""])
    for target, message in [("my_rewards:missing", "has no function 'missing'"),
                            ("no_such_module_xyz:f", "cannot import no_such_module_xyz")]:
        with pytest.raises(RecipeError, match=message):
            load_rewards(recipe_for("x/y", rewards=[{"function": target}]).rewards)


# ------------------------------------------------------------------------------------------ the loss


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    recipe = recipe_for(tiny_model_dir)
    return training_model(recipe)


def rollout_batch(objective, model, seed=0):
    """A training batch as `rollout` builds it, from random prompts and completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (4 + 3 * i,), generator=g).tolist() for i in range(2)]
    completions = [torch.randint(3, vocab, (2 + (5 * i) % 6,), generator=g).tolist() for i in range(6)]
    advantages = torch.randn(6, generator=g)
    run = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0), model=model,
                          accelerator=SimpleNamespace(device=torch.device("cpu")))
    batch = objective._batch(run, prompts, completions, advantages)
    batch.update(step_values=torch.zeros(len(objective.step_metrics)), token_scale=torch.tensor(1.0))
    return batch, prompts, completions, advantages


def plain_policy_gradient_loss(model, prompts, completions, advantages, mode, max_new_tokens, temperature=1.0):
    """-sum_i,t w_i,t A_i log pi(o_i,t) from one plain full-logits forward per sequence (w: the mode's weights),
    pi = softmax(logits / temperature)."""
    terms = []
    for i, c in enumerate(completions):
        ids = torch.tensor([prompts[i // 3] + c])
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompts[i // 3]) - 1 : -1].float() / temperature
        logp = F.log_softmax(logits, dim=-1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
        weight = {"grpo": 1 / (len(completions) * len(c)), "token": 1 / sum(map(len, completions)),
                  "dr_grpo": 1 / (len(completions) * max_new_tokens)}[mode]
        terms.append(-(weight * advantages[i] * logp).sum())
    return torch.stack(terms).sum()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", ["grpo", "token", "dr_grpo"])
@pytest.mark.parametrize("start", [True, False], ids=["adapter-at-start", "trained-adapter"])
def test_the_gradient_is_the_policy_gradient(base, tiny_model_dir, mode, start):
    """One update per generation: ratio 1, and at the start KL 0 on every token; the loss gradient is
    -sum w A grad log pi from plain forward passes, for each aggregation (pi at the sampling temperature)."""
    temperature = 1.0 if start else 0.7
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.zero_() if start else torch.nn.init.normal_(p, std=0.2)
    objective = GRPO(recipe_for(tiny_model_dir, grpo={"loss": mode, "beta": 0.04 if start else 0.0,
                                                      "temperature": temperature}))
    batch, prompts, completions, advantages = rollout_batch(objective, base)
    out = objective(base, batch)
    units = objective.units(batch)
    assert units == {"grpo": 6, "token": sum(map(len, completions)), "dr_grpo": 36}[mode]
    (out.total / units).backward()
    ours = grads(base)
    if start:  # policy = reference: the KL is exactly 0 on every token, the ratio exactly 1 (no clipping)
        assert out.metrics["kl"].item() == 0.0
    assert out.metrics["clip_fraction"].item() == 0.0
    plain_policy_gradient_loss(base, prompts, completions, advantages, mode, 6, temperature).backward()
    expected = grads(base)
    assert ours.keys() == expected.keys() and any(g.abs().sum() > 0 for g in ours.values())
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-3, atol=1e-6)
    # The loss is the clipped surrogate: at ratio 1 its value is -sum w A, whatever the log-probs.
    w = {"grpo": torch.tensor([1 / (6 * len(c)) for c in completions]) * torch.tensor(list(map(len, completions))),
         "token": torch.tensor(list(map(len, completions))) / sum(map(len, completions)),
         "dr_grpo": torch.tensor(list(map(len, completions))) / 36}[mode]
    assert (out.total / units).item() == pytest.approx(-(w * advantages).sum().item(), abs=1e-6)


def test_later_updates_on_one_generation_use_the_clipped_ratio(base, tiny_model_dir):
    """updates_per_generation 2: the sampling policy's log-probs are kept; after the policy moves, each token's
    loss is -min(rho A, clip(rho, 0.8, 1.2) A) with rho = pi / pi_old, from plain forward passes."""
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.zero_()
    objective = GRPO(recipe_for(tiny_model_dir, grpo={"updates_per_generation": 2, "beta": 0.0}))
    batch, prompts, completions, advantages = rollout_batch(objective, base, seed=1)
    out = objective(base, batch)  # the first update: ratio 1, nothing clipped
    assert out.metrics["clip_fraction"].item() == 0.0
    old = [plain_logps(base, prompts[i // 3], c) for i, c in enumerate(completions)]
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)  # the policy after an update
        out = objective(base, batch)
        expected, clipped = 0.0, 0
        for i, c in enumerate(completions):
            rho = torch.exp(plain_logps(base, prompts[i // 3], c) - old[i])
            a = advantages[i]
            expected += -torch.min(rho * a, rho.clamp(0.8, 1.2) * a).mean().item()
            clipped += int((((rho < 0.8) & (a < 0)) | ((rho > 1.2) & (a > 0))).sum())
    assert out.total.item() == pytest.approx(expected, rel=1e-4)
    assert clipped > 0 and out.metrics["clip_fraction"].item() == clipped  # (token_scale 1 here)


def plain_logps(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
    return F.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory):
    return task_data(tmp_path_factory.mktemp("grpo_data"), "grpo", train=12, eval=4)


def grpo_recipe(tmp_path, model_dir, data_dir, name="grpo", rewards=None, grpo=None, **training):
    return recipe_file(tmp_path, model_dir, data_dir, name, "grpo",
                       sections={"grpo": grpo or {}, **({"rewards": rewards} if rewards else {})}, **training)


def test_grpo_trains_through_the_cli_and_logs_rewards_and_samples(tmp_path, tiny_model_dir, grpo_data):
    result = train(grpo_recipe(tmp_path, tiny_model_dir, grpo_data, max_steps=3, eval_generate_steps=2,
                               eval_generate_examples=2, eval_max_new_tokens=4))
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "grpo"
    # no eval loss (nothing to score it against), but generation metrics on the eval prompts at step 2 and the end
    assert [m["step"] for m in metrics(run_dir) if "eval_exact_match" in m] == [2, 3]
    assert not any("eval_loss" in m for m in metrics(run_dir))
    rows = [m for m in metrics(run_dir) if "loss" in m]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert {"reward", "reward_std", "reward/contains", "reward/format", "reward_std/contains", "zero_std_groups",
            "completion_length", "completion_length_max", "kl", "clip_fraction", "time/generation_s",
            "generation_tokens_per_s", "step_s"} <= rows[0].keys()
    assert rows[0]["kl"] == 0.0 and rows[0]["clip_fraction"] == 0.0  # step 1: the policy is the reference
    assert 1 <= rows[0]["completion_length"] <= rows[0]["completion_length_max"] <= 8
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2] and len(samples) == 2 * 2 * 4
    first = [s for s in samples if s["step"] == 1]
    assert sum(s["reward"] for s in first) / 8 == pytest.approx(rows[0]["reward"], abs=1e-6)
    assert {"prompt", "reference", "completion", "rewards", "advantage"} <= first[0].keys()
    assert first[0]["reference"] == f"{TOY_WORDS[0]} {TOY_WORDS[0]}" or first[0]["reference"].count(" ") == 1


@pytest.mark.parametrize("mu,stop", [(1, 2), (2, 3)], ids=["one-update", "mid-reuse-cycle"])
def test_grpo_resume_reproduces_an_uninterrupted_run_generation_included(tmp_path, tiny_model_dir, grpo_data,
                                                                        monkeypatch, mu, stop):
    settings = {"updates_per_generation": mu}
    straight = grpo_recipe(tmp_path / "a", tiny_model_dir, grpo_data, grpo=settings)
    assert train(straight).exit_code == 0
    resumed = grpo_recipe(tmp_path / "b", tiny_model_dir, grpo_data, grpo=settings, save_steps=stop)
    with monkeypatch.context() as m:
        stop_after_save(m, stop)
        assert train(resumed).exit_code != 0
    result = train(resumed, "--resume")
    assert result.exit_code == 0, result.output
    a, b = tmp_path / "a" / "runs" / "grpo", tmp_path / "b" / "runs" / "grpo"
    keys = ("loss", "reward", "completion_length", "kl", "grad_norm")
    assert [[r[k] for k in keys] for r in metrics(a) if "loss" in r] == \
        [[r[k] for k in keys] for r in metrics(b) if "loss" in r]
    assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text()  # the same completions
    wa, wb = adapter(a / "checkpoint-final"), adapter(b / "checkpoint-final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_grpo_recipe_without_rewards_or_with_a_broken_reward_is_an_error(tmp_path, tiny_model_dir, grpo_data):
    path = grpo_recipe(tmp_path, tiny_model_dir, grpo_data)
    body = json.loads(path.read_text())
    body["rewards"] = []
    path.write_text(json.dumps(body))
    result = train(path)
    assert result.exit_code == 2 and "learns from rewards, and the recipe has none" in " ".join(result.output.split())
    (tmp_path / "bad_reward.py").write_text("def f(prompts, completions, references):\n"
                                            "    return ['x'] * len(completions)\n")
    body["rewards"] = [{"function": f"{tmp_path}/bad_reward.py:f"}]
    path.write_text(json.dumps(body))
    result = train(path)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "returned 'x', not a finite number on example 0" in text, result.output
    assert "Traceback" not in result.output
    body["rewards"] = [{"function": "no_such_module_xyz:f"}]
    body["name"], body["output_dir"] = "missing", str(tmp_path / "runs" / "missing")
    path.write_text(json.dumps(body))
    result = train(path)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "rewards[0].function 'no_such_module_xyz:f': cannot import" in text
    assert not (tmp_path / "runs" / "missing").exists()  # refused before the run directory, data or model


@pytest.mark.slow  # CI time (make test-slow runs it): one-process GRPO stays in the default suite
def test_two_processes_each_sample_for_their_own_prompts_and_stay_identical(tmp_path, tiny_model_dir, grpo_data):
    import sys

    from safetensors.torch import load_file

    from test_distributed import WORKER, launch

    (tmp_path / "worker.py").write_text(WORKER)
    path = grpo_recipe(tmp_path, tiny_model_dir, grpo_data, name="ddp", max_steps=2,
                       grpo={"updates_per_generation": 2})  # the checkpoints gather each process's reused batch
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
            str(tmp_path / "worker.py"), str(path), str(tmp_path)], cwd=tmp_path)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    rows = [m for m in metrics(tmp_path / "runs" / "ddp") if "loss" in m]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["reward"]) for r in rows)
    samples = [json.loads(x) for x in (tmp_path / "runs" / "ddp" / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["step"] == 1]) == 2 * 4  # the main process's 2 prompts x G
    from finetune.train.checkpoint import load_training_state

    saved = load_training_state(tmp_path / "runs" / "ddp" / "checkpoint-final")[1]["objective"]
    assert len(saved) == 2 and all(len(state["cache"]) == 1 for state in saved)  # one micro batch per process
    assert not torch.equal(saved[0]["cache"][0]["input_ids"], saved[1]["cache"][0]["input_ids"])  # own prompts


def patch_policy_forward(monkeypatch, at_step: int, action) -> None:
    """Run `action(logps)` on the policy forward (with grad) of step `at_step` (one micro batch per step)."""
    import finetune.objectives.grpo

    real, calls = finetune.objectives.grpo.token_logprobs, {"n": 0}

    def patched(model, batch, temperature=1.0):
        logps, seq = real(model, batch, temperature)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == at_step:
                logps = action(logps)
        return logps, seq

    monkeypatch.setattr(finetune.objectives.grpo, "token_logprobs", patched)


def test_sigterm_checkpoints_after_the_step_and_a_nan_step_is_skipped(tmp_path, tiny_model_dir, grpo_data,
                                                                       monkeypatch):
    import os
    import signal

    def sigterm(logps):
        os.kill(os.getpid(), signal.SIGTERM)
        return logps

    with monkeypatch.context() as m:
        patch_policy_forward(m, 2, sigterm)
        result = train(grpo_recipe(tmp_path, tiny_model_dir, grpo_data, name="sig"))
    assert result.exit_code == 143 and "Stopped by SIGTERM after step 2" in " ".join(result.output.split())
    assert (tmp_path / "runs" / "sig" / "checkpoint-2" / "adapter_model.safetensors").exists()
    with monkeypatch.context() as m:
        patch_policy_forward(m, 2, lambda logps: logps * float("nan"))
        result = train(grpo_recipe(tmp_path, tiny_model_dir, grpo_data, name="nan", nan_policy="skip_step"))
    assert result.exit_code == 0, result.output
    rows = metrics(tmp_path / "runs" / "nan")
    assert {"step": 2, "skipped": "non-finite loss or gradient"} in [{k: v for k, v in r.items() if k != "time"} for r in rows]
    assert [r["step"] for r in rows if "loss" in r] == [1, 3, 4]


@pytest.mark.parametrize("change,message", [
    ({"training": {"objective": "grpo", "eval_steps": 5}}, "grpo has no eval loss"),
    ({"data": {"train": ["u.jsonl"], "format": "text"}}, "data.format text has no prompt/answer split"),
    ({"data": {"train": ["u.jsonl"], "packing": True}}, "set data.packing false"),
    ({"training": {"objective": "sft"}}, "rewards are what training.objective grpo learns from"),
    ({"rewards": [{"function": "format"}]}, "reward format needs pattern"),
    ({"rewards": [{"function": "exact_match", "extract": "first_number"}]}, "expected none, last_number or regex"),
])
def test_grpo_recipe_rules(change, message):
    from pydantic import ValidationError

    body = {"model": {"name_or_path": "x/y"}, "data": {"train": ["u.jsonl"]}, "training": {"objective": "grpo"},
            "rewards": EXACT, **change}
    with pytest.raises(ValidationError, match=message):
        Recipe.model_validate(body)
