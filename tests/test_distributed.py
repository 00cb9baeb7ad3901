"""Two processes on CPU (gloo) through the real launchers, on the tiny NF4 model.

Data parallelism must be invisible in the numbers: with the same effective batch, 2 processes x 2
micro batches see exactly the examples 1 process x 4 micro batches sees, so the step losses agree;
the replicas stay identical; only the main process writes; and a 2-process run resumes exactly.

The same holds sharded: under recipes/accelerate/fsdp_qlora.yaml (FSDP2) each process holds half of every
weight, the 4-bit base included, and the run still gives one process's losses, a checkpoint plain PEFT
loads, and an exact resume. Exactness is checked in float32 (pinned in every recipe here): only the order
of summation differs between one process and two.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app

from conftest import free_port, recipe_file, write_jsonl

ROOT = Path(__file__).resolve().parents[1]

FSDP_PRESET = ROOT / "recipes" / "accelerate" / "fsdp_qlora.yaml"
# float32 sums of a few hundred terms in another order (per process, then across): a few ulps each, observed
# <= 2e-7 relative; 128 ulps leaves room and still catches a wrong batch or a lost gradient (~1e-2).
F32_REL = 128 * torch.finfo(torch.float32).eps

# Runs under torchrun or accelerate launch: train, then each rank saves the LoRA weights it ended with (its own
# shard of them where sharded) and the layout of every parameter it holds (global and local shape, dtype).
WORKER = """
import json, os, sys
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
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
params = dict(captured["model"].named_parameters())
local = lambda p: p.to_local() if isinstance(p, DTensor) else p
weights = {n: local(p).detach().contiguous() for n, p in params.items() if p.requires_grad}
save_file(weights, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.safetensors"))
layout = {n: {"shape": list(p.shape), "local": list(local(p).shape),
              "dtype": str(p.dtype), "trainable": p.requires_grad} for n, p in params.items()}
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(layout, f)
"""


def recipe(tmp, model_dir, name, dropout=0.1, compute_dtype="float32", **training):
    """conftest's recipe on the 4-bit base, LoRA on every linear layer, the schema's optimizer and seed: 6 steps of
    4 x 2, evaluated and saved every 3."""
    return recipe_file(tmp, model_dir, tmp, name, quantization={"load_in_4bit": True, "compute_dtype": compute_dtype},
                       lora={"dropout": dropout, "target_modules": "all-linear"}, data={"max_length": 48},
                       **{"learning_rate": 5e-3, "eval_steps": 3, "save_steps": 3, "optimizer": "paged_adamw_32bit",
                          "seed": 42, **training})


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def launch(args, cwd, timeout: int = 300):
    """Run a two-process launch to its end. One that hangs (seen twice in CI-like runs under two pytest workers,
    never alone) is sent SIGABRT, so that faulthandler prints where every process of it waited, and fails with that."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # (accelerate's dependency) the launcher's workers run in sessions of their own

        launcher = psutil.Process(proc.pid)
        procs = [*reversed(launcher.children(recursive=True)), launcher]
        for p in procs:  # the workers first, so the launcher does not stop them before they print
            p.send_signal(signal.SIGABRT)
        for p in psutil.wait_procs(procs, timeout=30)[1]:
            p.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{' '.join(map(str, args[1:4]))} ... hung for {timeout} s; where its processes waited:\n"
                    f"{out[-2000:]}\n{err[-12000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def accelerate_launch(config, *args):
    """`accelerate launch --config_file <config> --num_processes 2 <args>` on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(free_port()), *map(str, args)]


def crash_after_step_3(full, crashed):
    """A copy of run `full` as if killed right after checkpoint-3 (and after logging steps 4-5)."""
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoint-final")
    for name in ("summary.json", "loss.png"):
        (crashed / name).unlink(missing_ok=True)
    kept = [x for x in (crashed / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 5]
    (crashed / "metrics.jsonl").write_text("\n".join(kept) + "\n")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("ddp")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows)
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[:8])
    (tmp / "worker.py").write_text(WORKER)
    path = recipe(tmp, tiny_model_dir, "ddp")
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), str(tmp / "worker.py"), str(path), str(tmp)], cwd=tmp)
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
        assert abs(a[step] - b[step]) < F32_REL * max(1.0, abs(a[step])), (step, a[step], b[step])


def test_two_process_run_resumes_exactly(two_process_run, tiny_model_dir):
    tmp = two_process_run
    full = tmp / "runs" / "ddp"
    crashed = tmp / "runs" / "crashed"
    crash_after_step_3(full, crashed)
    path = recipe(tmp, tiny_model_dir, "crashed")
    launch([sys.executable, "-m", "finetune", "train", str(path), "--nproc", "2", "--resume"], cwd=tmp)
    a, b = losses(full), losses(crashed)
    assert [b[s] for s in (4, 5, 6)] == pytest.approx([a[s] for s in (4, 5, 6)], abs=1e-6)
    wa = load_file(full / "checkpoint-final" / "adapter_model.safetensors")
    wb = load_file(crashed / "checkpoint-final" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_presets_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {f.stem: load_config_from_file(str(f)) for f in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    kinds = {name: config.distributed_type.value for name, config in configs.items()}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp_qlora": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    assert configs["fsdp_qlora"].fsdp_config["fsdp_version"] == 2  # FSDP1 shards on GPUs only


def test_every_process_ends_its_training(tmp_path, monkeypatch):
    """A process other than the main one ends its training too (accelerate's end_training: it destroys the process
    group). Once only the main one did, and a second process of a finished run sometimes aborted at exit (SIGABRT,
    "terminate called without an active exception"), so torchrun reported the run as failed."""
    import types

    import finetune.train.loop as loop

    ended = []
    monkeypatch.setattr(loop, "evaluate", lambda run: None)
    monkeypatch.setattr(loop, "save", lambda run, name, last_eval: tmp_path / name)
    monkeypatch.setattr(loop.time, "sleep", lambda s: ended.append(f"slept {s}"))
    run = types.SimpleNamespace(main=False, eval_dl=None, accelerator=types.SimpleNamespace(
        end_training=lambda: ended.append("ended"), num_processes=2), recipe=types.SimpleNamespace(
        training=types.SimpleNamespace(eval_generate_steps=0), run_dir=tmp_path))
    assert loop.finish(run, started=0.0) == tmp_path / "checkpoint-final"
    assert not (tmp_path / "summary.json").exists()  # the main process writes the summary
    # then it waits with the GIL free, so that gloo's workers release the last collectives before the group's
    # destructor joins them (a rank once hung there: finetune/train/loop.py)
    assert ended == ["ended", "slept 0.2"]


# ------------------------------------------------------------------ FSDP2: the 4-bit base sharded over gloo


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir, toy_alpaca_rows):
    """The shipped FSDP preset on 2 CPU processes (6 steps, checkpoint and eval at step 3), and the one-process
    reference with the same effective batch (4 x 2 x 2 = 4 x 4 x 1). No dropout: its draws differ between them."""
    tmp = tmp_path_factory.mktemp("fsdp")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows)
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[:8])
    (tmp / "worker.py").write_text(WORKER)
    path = recipe(tmp, tiny_model_dir, "fsdp", dropout=0.0, optimizer="adamw_torch")
    launch(accelerate_launch(FSDP_PRESET, tmp / "worker.py", path, tmp), cwd=tmp)
    one = recipe(tmp, tiny_model_dir, "one", dropout=0.0, optimizer="adamw_torch", gradient_accumulation_steps=4)
    result = CliRunner().invoke(app, ["train", str(one)])
    assert result.exit_code == 0, result.output
    return tmp


def test_fsdp_shards_the_4bit_base_and_the_adapter_across_the_processes(fsdp_run, tiny_model_dir):
    """Each process holds its half of every weight (accelerate alone would train CPU processes as DDP, whole
    copies): the NF4 codes too, stored in float32 (8 codes per element) so that FSDP can shard them."""
    tmp = fsdp_run
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    original = load_file(tiny_model_dir / "model.safetensors")
    codes = 0
    for name, held in ranks[0].items():
        other = ranks[1][name]
        assert held["local"][0] + other["local"][0] == held["shape"][0] and held["local"][0] < held["shape"][0], name
        if name.endswith("base_layer.weight"):  # a frozen 4-bit layer: its packed codes
            source = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert held["dtype"] == "torch.float32" and held["shape"][1:] == [1], name
            assert held["shape"][0] * 8 == original[source].numel(), name
            codes += 1
    assert codes == 14  # q, k, v, o, gate, up, down in each of the 2 layers
    assert {n for n, p in ranks[0].items() if p["trainable"]} == {n for n in ranks[0] if ".lora_" in n}
    # the adapter each process ended with is its half; the checkpoint holds the two halves, gathered on save
    shards = [load_file(tmp / f"rank{r}.safetensors") for r in (0, 1)]
    assert shards[0].keys() == shards[1].keys() == {n for n in ranks[0] if ".lora_" in n}
    whole = {n.replace(".default", ""): torch.cat([shards[0][n], shards[1][n]]) for n in shards[0]}
    run = tmp / "runs" / "fsdp"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-final"]
    saved = load_file(run / "checkpoint-final" / "adapter_model.safetensors")
    assert saved.keys() == whole.keys() and all(torch.equal(saved[n], w) for n, w in whole.items())


def test_fsdp_gives_the_losses_of_one_process_with_the_same_effective_batch(fsdp_run):
    tmp = fsdp_run
    rows = {name: [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "fsdp")}
    for key in ("loss", "eval_loss"):
        a, b = ({r["step"]: r[key] for r in rows[name] if key in r} for name in ("one", "fsdp"))
        assert a.keys() == b.keys() == ({1, 2, 3, 4, 5, 6} if key == "loss" else {3, 6})
        for step in a:
            assert abs(a[step] - b[step]) <= F32_REL * abs(a[step]), (key, step, a[step], b[step])
    wa = load_file(tmp / "runs" / "one" / "checkpoint-final" / "adapter_model.safetensors")
    wb = load_file(tmp / "runs" / "fsdp" / "checkpoint-final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # Adam divides by sqrt(v): a gradient's last bits move a weight by up to ~lr x 1e-4 over 6 steps
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), (k, (wa[k] - wb[k]).abs().max())


def test_fsdp_checkpoint_loads_in_plain_peft(fsdp_run, tiny_model_dir):
    from test_gpu import plain_peft_loads

    assert plain_peft_loads(fsdp_run / "runs" / "fsdp" / "checkpoint-final", tiny_model_dir) == 28


def test_fsdp_run_resumes_exactly(fsdp_run, tiny_model_dir):
    """The documented command, resumed from checkpoint-3: each process gets back its shards of the adapter and of
    the optimizer state (gathered whole on save), so steps 4-6 are the uninterrupted run's, bit for bit."""
    tmp = fsdp_run
    full, crashed = tmp / "runs" / "fsdp", tmp / "runs" / "crashed-fsdp"
    crash_after_step_3(full, crashed)
    path = recipe(tmp, tiny_model_dir, "crashed-fsdp", dropout=0.0, optimizer="adamw_torch")
    launch(accelerate_launch(FSDP_PRESET, "-m", "finetune", "train", path, "--resume"), cwd=tmp)
    a, b = losses(full), losses(crashed)
    assert list(b) == [1, 2, 3, 4, 5, 6]  # steps 4-5 logged before the crash were dropped and redone
    assert b == a
    wa = load_file(full / "checkpoint-final" / "adapter_model.safetensors")
    wb = load_file(crashed / "checkpoint-final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cpu_refuses_what_cannot_shard_there_in_one_paragraph(tmp_path, tiny_model_dir, monkeypatch):
    """FSDP1 (the old preset: fsdp_sync_module_states, which accelerate implements on accelerators only) and
    DeepSpeed (which accelerate would turn into unsharded DDP on CPU): exit 2 naming the setting, no traceback."""
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "a", "output": "b"}])
    path = recipe(tmp_path, tiny_model_dir, "x", optimizer="adamw_torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = {"fsdp_version: 1": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
                                 "FSDP_SYNC_MODULE_STATES": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
             "distributed_type: DEEPSPEED": {"ACCELERATE_USE_DEEPSPEED": "true"}}
    for setting, env in cases.items():
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            result = CliRunner().invoke(app, ["train", str(path), "--overwrite"])
        text = " ".join(result.output.split())  # as one paragraph, whatever the console's width
        assert result.exit_code == 2, result.output
        assert text.startswith(f"error: The accelerate config sets {setting}") and "fsdp_qlora.yaml" in text, text
        assert "Traceback" not in text


def test_fsdp2_refuses_what_cannot_run_sharded(tmp_path, tiny_model_dir, monkeypatch):
    from finetune.errors import RecipeError
    from finetune.model.placement import resolve
    from finetune.recipe.file import load_recipe
    from finetune.train.distributed import check_strategy

    write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}])
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "a", "output": "b"}])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    path = recipe(tmp_path, tiny_model_dir, "x", optimizer="adamw_torch")
    check_strategy(load_recipe(path), resolve(load_recipe(path).quantization))  # the tested setting passes
    refused = {
        "training.optimizer=paged_adamw_32bit": "no rule for the sharded \\(DTensor\\) parameters",
        "training.eval_generate_steps=3": "waits forever",
        "training.objective=grpo": "train it with DDP",
    }
    for override, reason in refused.items():
        extra = ["rewards=[{function: exact_match}]", "training.eval_steps=null"] if "grpo" in override else []
        r = load_recipe(path, [override, *extra])
        with pytest.raises(RecipeError, match=f"{override.split('=')[0]} .*{reason}"):
            check_strategy(r, resolve(r.quantization))
    # and through the CLI (one plain process: refused before anything loads), exit 2
    result = CliRunner().invoke(app, ["train", str(path), "training.optimizer=paged_adamw_32bit"])
    assert result.exit_code == 2 and "training.optimizer paged_adamw_32bit" in " ".join(result.output.split())


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


@pytest.mark.slow  # CI time (make test-slow runs it): SFT's two-process losses stay in the default suite
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


@pytest.mark.slow
def test_ddp_over_two_nodes_gives_the_losses_of_one_process(two_process_run, tiny_model_dir):
    """torchrun --nnodes 2, one process each, meeting at a c10d rendezvous on 127.0.0.1 (what two machines run,
    each with its own node): the same losses as one process with the same effective batch; one writer."""
    tmp = two_process_run
    one = recipe(tmp, tiny_model_dir, "one-ref", dropout=0.0, gradient_accumulation_steps=4)
    result = CliRunner().invoke(app, ["train", str(one)])
    assert result.exit_code == 0, result.output
    path = recipe(tmp, tiny_model_dir, "nodes", dropout=0.0)
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t",
                               "-m", "finetune", "train", str(path)],
                              cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    a, b = losses(tmp / "runs" / "one-ref"), losses(tmp / "runs" / "nodes")
    assert a.keys() == b.keys() == set(range(1, 7))  # logged once each: one writer
    for step in a:
        assert abs(a[step] - b[step]) <= F32_REL * abs(a[step]), (step, a[step], b[step])
    banners = [" ".join(o.split()).count("effective batch 4 x 2 x 2 processes") for o in outputs]
    assert sorted(banners) == [0, 1], outputs  # the global main process speaks, once
