"""Two processes on CPU (gloo) through the real launchers, on the tiny NF4 model.

Data parallelism must be invisible in the numbers: with the same effective batch, 2 processes x 2
micro batches see exactly the examples 1 process x 4 micro batches sees, so the step losses agree;
the replicas stay identical; only the main process writes; and a 2-process run resumes exactly.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]

# Runs under torchrun: train, then each rank saves the LoRA weights it ended with.
WORKER = """
import os, sys
from safetensors.torch import save_file
import finetune.train.setup as setup
from finetune.train import train
from finetune.recipe.file import load_recipe

captured = {}
attach = setup.attach_lora
def capture(*a, **k):
    captured["model"] = attach(*a, **k)
    return captured["model"]
setup.attach_lora = capture
train(load_recipe(sys.argv[1]))
weights = {n: p.detach().contiguous() for n, p in captured["model"].named_parameters() if p.requires_grad}
save_file(weights, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors"))
"""


def recipe(tmp, model_dir, name, dropout=0.1, **training):
    body = {
        "name": name, "output_dir": str(tmp / "runs" / name),
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": dropout},
        "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "max_length": 48},
        "training": {"max_steps": 6, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
                     "warmup_steps": 1, "logging_steps": 1, "eval_steps": 3, "save_steps": 3,
                     "gradient_checkpointing": False, **training},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(body))
    return path


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def launch(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("ddp")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows)
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[:8])
    (tmp / "worker.py").write_text(WORKER)
    path = recipe(tmp, tiny_model_dir, "ddp")
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            str(tmp / "worker.py"), str(path), str(tmp)], cwd=tmp)
    return tmp


def test_replicas_stay_identical_and_only_main_writes(two_process_run):
    tmp = two_process_run
    rank0, rank1 = load_file(tmp / "rank0.safetensors"), load_file(tmp / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    run = tmp / "runs" / "ddp"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-final"]
    assert not list(tmp.glob("**/*.tmp*")), "a temporary checkpoint directory was left behind"
    # every logged step appears once: one writer
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]
    saved = load_file(run / "checkpoint-final" / "adapter_model.safetensors")  # PEFT drops the adapter name
    assert {n.replace(".default", "") for n in rank0} == saved.keys()
    assert all(torch.equal(saved[n.replace(".default", "")], w) for n, w in rank0.items())


def test_same_effective_batch_gives_the_same_losses_as_one_process(two_process_run, tiny_model_dir):
    tmp = two_process_run
    # dropout draws differ between one and two processes, so compare without it
    one = recipe(tmp, tiny_model_dir, "one", gradient_accumulation_steps=4)
    two = recipe(tmp, tiny_model_dir, "two")
    for path in (one, two):
        body = json.loads(path.read_text())
        body["lora"]["dropout"] = 0.0
        path.write_text(json.dumps(body))
    result = CliRunner().invoke(app, ["train", str(one)])
    assert result.exit_code == 0, result.output
    launch([sys.executable, "-m", "finetune", "train", str(two), "--nproc", "2"], cwd=tmp)
    a, b = losses(tmp / "runs" / "one"), losses(tmp / "runs" / "two")
    assert a.keys() == b.keys() == set(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5 * max(1.0, abs(a[step])), (step, a[step], b[step])


def test_two_process_run_resumes_exactly(two_process_run, tiny_model_dir):
    tmp = two_process_run
    full = tmp / "runs" / "ddp"
    crashed = tmp / "runs" / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint-final")
    for name in ("summary.json", "loss.png"):
        (crashed / name).unlink(missing_ok=True)
    kept = [x for x in (crashed / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 3]
    (crashed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    path = recipe(tmp, tiny_model_dir, "crashed")
    launch([sys.executable, "-m", "finetune", "train", str(path), "--nproc", "2", "--resume"], cwd=tmp)
    a, b = losses(full), losses(crashed)
    assert [b[s] for s in (4, 5, 6)] == pytest.approx([a[s] for s in (4, 5, 6)], abs=1e-6)
    wa = load_file(full / "checkpoint-final" / "adapter_model.safetensors")
    wb = load_file(crashed / "checkpoint-final" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_presets_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {f.stem: load_config_from_file(str(f)).distributed_type.value
             for f in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp_qlora": "FSDP", "deepspeed_zero3": "DEEPSPEED"}


def test_sharded_launch_requires_float_quant_storage(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from finetune.train.distributed import check_strategy
    from finetune.model.placement import resolve
    from finetune.errors import RecipeError
    from finetune.recipe.file import load_recipe

    write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}])
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "a", "output": "b"}])
    r = load_recipe(recipe(tmp_path, tiny_model_dir, "x"))
    assert resolve(r.quantization).quant_storage == torch.uint8  # single process: the compact default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sharded = resolve(r.quantization)
    assert sharded.quant_storage == sharded.compute_dtype and sharded.quant_storage.is_floating_point
    check_strategy(r, resolve(r.quantization))
    bad = load_recipe(recipe(tmp_path, tiny_model_dir, "x"), ["quantization.quant_storage=uint8"])
    with pytest.raises(RecipeError, match="quant_storage is uint8 but fsdp shards parameters"):
        check_strategy(bad, resolve(bad.quantization))
    with pytest.raises(RecipeError, match="paged_adamw_8bit"):
        eight_bit = load_recipe(recipe(tmp_path, tiny_model_dir, "x"), ["training.optimizer=paged_adamw_8bit"])
        check_strategy(eight_bit, resolve(eight_bit.quantization))


def test_dpo_on_two_processes_gives_the_same_losses_as_one(tmp_path, tiny_model_dir):
    """DPO's loss of a step is the mean over the step's pairs on all processes: 2 processes x 2 micro
    batches of 2 pairs equal 1 process x 4 micro batches (the reference forward included)."""
    from test_preference import preference_rows

    write_jsonl(tmp_path / "train.jsonl", preference_rows(32))
    write_jsonl(tmp_path / "eval.jsonl", preference_rows(6))
    paths = {}
    for name, accumulation in (("one", 4), ("two", 2)):
        path = recipe(tmp_path, tiny_model_dir, name, max_steps=3, micro_batch_size=2, eval_steps=3, save_steps=3,
                      gradient_accumulation_steps=accumulation, objective="dpo")
        body = json.loads(path.read_text())
        body["lora"]["dropout"] = 0.0
        body["data"]["format"] = "preference"
        path.write_text(json.dumps(body))
        paths[name] = path
    result = CliRunner().invoke(app, ["train", str(paths["one"])])
    assert result.exit_code == 0, result.output
    launch([sys.executable, "-m", "finetune", "train", str(paths["two"]), "--nproc", "2"], cwd=tmp_path)
    a, b = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert a.keys() == b.keys() == {1, 2, 3}
    assert a[1] == pytest.approx(0.6931472, abs=1e-6)  # LoRA B = 0: policy = reference, on every process
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
