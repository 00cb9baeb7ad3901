"""The CPU dtype legs: every objective and every adapter method through train, eval, merge (or its refusal),
export, chat and serve on the tiny model, in each CPU compute dtype, forced with FINETUNE_CPU_DTYPE.

The rest of the suite runs in the dtype `compute_dtype: auto` picks on the machine at hand (float32 on AVX2-only
CPUs, bfloat16 with AVX512_BF16 or AMX) and pins float32 where it compares exactly. This module runs the same
matrix in both dtypes on any machine, so what was built on one kind of CPU holds on the others (bf16 on an AVX2
machine is emulated: slow for big matrices, not for these).

What it covers, and why not the full cross product: the dtype-sensitive seams are (i) each objective's loss path
(next-token loss, pairs of sequences, feedback with a KL batch, a score head, rollouts) and (ii) each method's
modules meeting activations of the compute dtype (IA3's scaling vectors, AdaLoRA's SVD triplets, DoRA's norms,
virtual-token embeddings and prefix key/values, QA-LoRA's pooling, PiSSA's SVD init). Ten runs cover every
objective once and every method or variant once, each non-LoRA method paired with a non-SFT objective, on both
kinds of base (NF4 and float). Per run: training's last eval loss is what `finetune eval` reports (the same
forward, in the same dtype); merge folds the weight methods within the float32 merge tolerance and refuses the
others; chat answers; three runs are exported to GGUF and read back; the NF4 LoRA adapters are served together.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app

from conftest import recipe_file, task_data

runner = CliRunner()
LEGS = ("float32", "bfloat16")
PROMPT = "Repeat the word twice. cat"
# name: (objective, method, 4-bit base, method section / lora keys, learning rate)
RUNS = {
    "sft-lora": ("sft", "lora", True, {}, 1e-2),
    "sft-rslora": ("sft", "lora", False, {"use_rslora": True}, 1e-2),
    "sft-pissa": ("sft", "lora", False, {"init": "pissa"}, 1e-3),
    "sft-qalora": ("sft", "lora", True, {"use_qalora": True, "qalora_group_size": 16}, 1e-2),
    "reward-dora": ("reward", "lora", False, {"use_dora": True, "dropout": 0.0}, 5e-3),
    "dpo-ia3": ("dpo", "ia3", True, {}, 0.1),
    "kto-adalora": ("kto", "adalora", True, {"init_r": 4, "target_r": 2, "target_modules": ["q_proj", "v_proj"],
                                             "tinit": 1, "tfinal": 1}, 0.05),
    "orpo-prompt_tuning": ("orpo", "prompt_tuning", False, {"num_virtual_tokens": 4}, 0.1),
    "simpo-prefix_tuning": ("simpo", "prefix_tuning", False, {"num_virtual_tokens": 4, "projection": True,
                                                              "encoder_hidden_size": 32}, 0.05),
    "grpo-p_tuning": ("grpo", "p_tuning", False, {"num_virtual_tokens": 4, "encoder_hidden_size": 32}, 0.01),
}
VIRTUAL = {"prompt_tuning", "prefix_tuning", "p_tuning"}
# Runs whose checkpoint is not bit for bit the model training evaluated, only in float32 terms: PiSSA's is
# converted to a rank-2r LoRA over the published base (training ran on the residual base W - sBA, rounded to bf16);
# AdaLoRA's holds the re-allocated ranks with the pruned ones cut out (training multiplied by zeros: other sums);
# prefix tuning's holds the prompt encoder's output computed in float32 when PEFT saves it (training ran the encoder
# under autocast). In float32 these agree to rounding; in bf16 to the dtype's precision: 2^-8 relative per rounding,
# grown over the 3 steps' forward to at most ~2% of the loss (measured: 9e-4, 4e-4 and 1.3%).
CONVERTED = {"sft-pissa", "kto-adalora", "simpo-prefix_tuning"}
EXPORTED = ("sft-lora", "sft-rslora", "dpo-ia3")
SERVED = ("sft-lora", "sft-qalora")  # LoRA adapters on the one NF4 base: one batch of mixed adapters


@pytest.fixture(scope="module", params=LEGS)
def leg(request, tmp_path_factory):
    """(dtype, a cache of trained runs) with FINETUNE_CPU_DTYPE set for the whole leg."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FINETUNE_CPU_DTYPE", request.param)
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # matrices this small gain nothing from threads
        yield request.param, tmp_path_factory.mktemp(f"leg-{request.param}"), {}
        torch.set_num_threads(before)


def trained(leg, tiny_model_dir, name: str):
    """The run `name` of this leg, trained once (3 steps, an eval at the end)."""
    dtype, root, done = leg
    if name not in done:
        objective, method, nf4, section, lr = RUNS[name]
        data = task_data(root / f"data-{objective}", objective, train=12, eval=4)
        lora = section if method == "lora" else None
        sections = {method: section} if method != "lora" else {}
        # GRPO has no eval loss: its eval step scores greedy generations (the same decoding as `eval --generate`)
        evals = ({"eval_generate_steps": 3, "eval_generate_examples": 2, "eval_max_new_tokens": 6}
                 if objective == "grpo" else {"eval_steps": 3})
        recipe = recipe_file(root / name, tiny_model_dir, data, name, objective, method=method, lora=lora,
                             quantization={"load_in_4bit": nf4}, sections=sections, max_steps=3, save_steps=3,
                             learning_rate=lr, warmup_steps=0, **evals)
        result = runner.invoke(app, ["train", str(recipe)])
        assert result.exit_code == 0, result.output
        assert f"compute dtype {dtype}" in " ".join(result.output.split())
        done[name] = recipe, root / name / "runs" / name
    return done[name]


def lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(RUNS))
def test_training_trains_and_eval_reports_the_eval_loss_training_logged(leg, tiny_model_dir, name):
    recipe, run_dir = trained(leg, tiny_model_dir, name)
    losses = [m["loss"] for m in lines(run_dir) if "loss" in m]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    out, samples = run_dir.parent / "eval.json", run_dir.parent / "samples.jsonl"
    generate = ["--generate", "2", "--max-new-tokens", "6", "--batch-size", "2", "--samples", str(samples)]
    result = runner.invoke(app, ["eval", str(recipe), "--adapter", str(run_dir / "checkpoint-final"), "--json",
                                 str(out), *(generate if RUNS[name][0] == "grpo" else [])])
    assert result.exit_code == 0, result.output
    if RUNS[name][0] == "grpo":  # the greedy generations of training's last eval step, token for token
        logged = [json.loads(x) for x in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
        ours = [json.loads(x)["prediction"] for x in samples.read_text().splitlines()]
        assert ours == [s["prediction"] for s in logged if s["step"] == 3] and len(ours) == 2
        return
    measured = json.loads(out.read_text())["models"]["adapter"]["metrics"]
    logged = [m for m in lines(run_dir) if "eval_loss" in m][-1]
    # the same model, data and forward in the same dtype: equal up to float32 summation (eval batches the rows
    # the way training's eval does, and bf16 enters only inside the forward, under the same autocast)
    rel = 2e-2 if leg[0] == "bfloat16" and name in CONVERTED else 1e-6
    assert measured["loss"] == pytest.approx(logged["eval_loss"], rel=rel)


@pytest.mark.parametrize("name", list(RUNS))
def test_merge_folds_weight_methods_and_refuses_the_others(leg, tiny_model_dir, name, tmp_path):
    _, run_dir = trained(leg, tiny_model_dir, name)
    objective, method, *_ = RUNS[name]
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(run_dir / "checkpoint-final"), "--out", str(out)])
    text = " ".join(result.output.split())
    if method in VIRTUAL or objective == "reward":
        assert result.exit_code == 2 and not out.exists(), result.output
        assert ("not a change to any weight" in text) if method in VIRTUAL else ("is a reward model's adapter" in text)
        return
    assert result.exit_code == 0, result.output
    fidelity = json.loads((out / "merge_report.json").read_text())["fidelity"]
    chosen = fidelity[json.loads((out / "merge_report.json").read_text())["base_weights"]]
    assert chosen["max_abs_logit_diff"] < 1e-4 and chosen["top1_agreement"] == 1.0  # merge computes in float32


@pytest.mark.parametrize("name", EXPORTED)
def test_export_writes_a_gguf_that_reads_back_like_the_merged_model(leg, tiny_model_dir, name, tmp_path):
    _, run_dir = trained(leg, tiny_model_dir, name)
    out = tmp_path / f"{name}.gguf"
    result = runner.invoke(app, ["export", str(run_dir / "checkpoint-final"), "--out", str(out), "--type", "f16"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export_report.json").read_text())
    # f16 weights: logits within a few hundredths; a near-tie may flip one probe token's top-1
    assert report["fidelity"]["max_abs_logit_diff"] < 0.05 and report["fidelity"]["top1_agreement"] > 0.97


@pytest.mark.parametrize("name", [n for n in RUNS if RUNS[n][0] != "reward"])
def test_chat_answers_with_each_adapter(leg, tiny_model_dir, name):
    _, run_dir = trained(leg, tiny_model_dir, name)
    result = runner.invoke(app, ["chat", str(run_dir / "checkpoint-final"), "--prompt", PROMPT,
                                 "--max-new-tokens", "6"])
    assert result.exit_code == 0 and result.stdout.strip(), result.output


def test_serve_answers_mixed_adapters_in_one_batch_as_chat_does(leg, tiny_model_dir):
    from test_serve import Server, chat  # noqa: F401  (needs the serve extra, as test_serve does)

    from finetune.serve import ServeOptions, load

    paths = {name: trained(leg, tiny_model_dir, name)[1] / "checkpoint-final" for name in SERVED}
    expected = {}
    for name, path in paths.items():
        result = runner.invoke(app, ["chat", str(path), "--prompt", "Repeat the word twice.", "--max-new-tokens",
                                     "20"])
        assert result.exit_code == 0, result.output
        expected[name] = result.stdout.strip()
    first, *others = SERVED
    server = Server(load(str(paths[first]), adapters={n: str(paths[n]) for n in others},
                         options=ServeOptions(max_tokens=64)))
    try:
        import concurrent.futures

        client = server.client(key="unused")
        with concurrent.futures.ThreadPoolExecutor(len(SERVED)) as pool:
            replies = dict(zip(SERVED, pool.map(lambda n: chat(client, n).choices[0].message.content, SERVED)))
        assert replies == expected
    finally:
        server.stop()
