"""Training you can trust: exact resume, atomic checkpoints, signals, NaN guard, run records, determinism.

Every test runs the real `finetune train` CLI on the 2-layer fixture model (plain LoRA, fp32 on CPU)
for a handful of steps. 20 training rows at micro batch 4 with gradient accumulation 2 give 5 micro
batches per epoch, i.e. optimizer steps of 2, 2 and 1 micro batches: epoch boundaries and a short last
group are exercised within 6 steps.
"""

import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import finetune.train.checkpoint
import finetune.objectives.base
import finetune.train.events
from finetune.train.checkpoint import find_resume_checkpoint
from finetune.cli import app
from finetune.artifacts.manifest import write_manifest

from conftest import recipe_file, write_jsonl

runner = CliRunner()
STEPS = 6
ROWS = 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matmuls this small gain nothing from threads; on a busy 2-core machine, thread hand-offs cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("training_data")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows[:ROWS])
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[40:48])
    return tmp


def make_recipe(tmp_path: Path, model_dir, data_dir, name="run", quantization=None, **training) -> Path:
    """A recipe for a few-step run with dropout, shuffling, accumulation and a per-step metrics line."""
    return recipe_file(tmp_path, model_dir, data_dir, name, quantization=quantization, **{"max_steps": STEPS, **training})


def train(recipe: Path, *args: str):
    return runner.invoke(app, ["train", str(recipe), *args])


def flat(text: str) -> str:
    """CLI output without whitespace: rich wraps long paths at the terminal width."""
    return "".join(text.split())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol=1e-6) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def stop_after_save(monkeypatch, at_step: int) -> None:
    """Make the run die (like a kill) right after checkpoint-<at_step> is complete."""
    real = finetune.train.checkpoint.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        if path.name == f"checkpoint-{at_step}":
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(finetune.train.checkpoint, "save_checkpoint", save_then_die)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, data):
    """An uninterrupted run of STEPS steps, the reference for resumed runs."""
    tmp = tmp_path_factory.mktemp("straight")
    recipe = make_recipe(tmp, tiny_model_dir, data, eval_steps=2)
    result = train(recipe)
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "run"


@pytest.mark.parametrize("stop_at", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_reproduces_an_uninterrupted_run(straight, tmp_path, tiny_model_dir, data, monkeypatch, stop_at):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2, save_steps=stop_at)
    run_dir = tmp_path / "runs" / "run"
    with monkeypatch.context() as m:
        stop_after_save(m, stop_at)
        result = train(recipe)
    assert result.exit_code == 130, result.output
    assert max(losses(run_dir)) == stop_at and not (run_dir / "summary.json").exists()

    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resumingfrom{run_dir / f'checkpoint-{stop_at}'}" in flat(result.output)
    expected = losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses(run_dir) == expected  # exactly equal, at every step
    evals = [(m["step"], m["eval_loss"]) for m in metrics(run_dir) if "eval_loss" in m]
    assert evals == [(m["step"], m["eval_loss"]) for m in metrics(straight) if "eval_loss" in m]
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final")


def test_same_seed_gives_identical_losses(straight, tmp_path, tiny_model_dir, data):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2)
    assert train(recipe).exit_code == 0
    again = tmp_path / "runs" / "run"
    assert losses(again) == losses(straight)
    assert_same_adapter(again / "checkpoint-final", straight / "checkpoint-final", atol=0)


def test_resume_is_exact_on_a_4bit_base_with_the_default_optimizer(tmp_path, tiny_model_dir, data, monkeypatch):
    """QLoRA as users run it: NF4 base, bitsandbytes' paged AdamW (its CPU fallback here)."""
    qlora = {"quantization": {"load_in_4bit": True}, "optimizer": "paged_adamw_32bit", "max_steps": 3}
    straight_recipe = make_recipe(tmp_path / "a", tiny_model_dir, data, **qlora)
    resumed_recipe = make_recipe(tmp_path / "b", tiny_model_dir, data, save_steps=2, **qlora)
    assert train(straight_recipe).exit_code == 0
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed_recipe).exit_code == 130
    result = train(resumed_recipe, "--resume")
    assert result.exit_code == 0, result.output
    a, b = tmp_path / "a" / "runs" / "run", tmp_path / "b" / "runs" / "run"
    assert losses(b) == losses(a) and len(losses(a)) == 3
    assert_same_adapter(b / "checkpoint-final", a / "checkpoint-final")


def poison_micro_batch(monkeypatch, n: int, what: str) -> None:
    """Make training micro batch n give a NaN loss, or a finite loss with NaN gradients.
    Micro batches 1-2 are step 1, 3-4 step 2, 5 step 3 (the epoch's short last step), 6-7 step 4."""
    real = finetune.objectives.base.token_loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch):
        calls["n"] += model.training
        loss = real(model, batch)
        if model.training and calls["n"] == n:
            if what == "loss":
                return loss * float("nan")
            lora_a = next(p for name, p in model.named_parameters() if "lora_A" in name)
            return loss + (lora_a.sum() * 0).abs().sqrt()  # value 0, gradient 0 * inf = NaN
        return loss

    monkeypatch.setattr(finetune.objectives.base, "token_loss_sum", loss_sum)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, data, monkeypatch, what):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, save_steps=2)
    run_dir = tmp_path / "runs" / "run"
    with monkeypatch.context() as m:
        poison_micro_batch(m, 5, what)
        result = train(recipe)
    assert result.exit_code == 3, result.output
    assert "Step 3:" in result.output and "not finite" in result.output and "nan_policy" in result.output
    assert max(losses(run_dir)) == 2  # nothing logged for the bad step
    assert [p.name for p in sorted(run_dir.glob("checkpoint-*"))] == ["checkpoint-2"]
    assert all(torch.isfinite(w).all() for w in adapter(run_dir / "checkpoint-2").values())
    result = train(recipe, "--resume")  # the last good checkpoint is intact and resumable
    assert result.exit_code == 0, result.output
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_skip_step_policy_skips_the_bad_step_and_finishes(tmp_path, tiny_model_dir, data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, nan_policy="skip_step")
    run_dir = tmp_path / "runs" / "run"
    poison_micro_batch(monkeypatch, 5, "loss")
    result = train(recipe)
    assert result.exit_code == 0, result.output
    rows = metrics(run_dir)
    assert {"step": 3, "skipped": "non-finite loss or gradient"} in [{k: v for k, v in r.items() if k != "time"} for r in rows]
    assert sorted(losses(run_dir)) == [1, 2, 4, 5, 6]  # no made-up loss for the skipped step
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert all(torch.isfinite(w).all() for w in adapter(run_dir / "checkpoint-final").values())
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == [3]


# The real CLI in a child process, slowed to ~0.3 s per micro batch so that a signal lands mid-run.
PACED_CLI = """
import sys, time
import finetune.objectives.base as t
real = t.token_loss_sum
def paced(model, batch):
    time.sleep(0.3)
    return real(model, batch)
t.token_loss_sum = paced
from finetune.cli import app
app(prog_name="finetune")
"""


def test_sigint_checkpoints_after_the_step_and_resume_finishes_the_run(straight, tmp_path, tiny_model_dir, data):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2)  # the straight run's recipe
    run_dir = tmp_path / "runs" / "run"
    child = subprocess.Popen([sys.executable, "-c", PACED_CLI, "train", str(recipe)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
            assert child.poll() is None and time.monotonic() < deadline, child.stdout.read()
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        output = child.communicate(timeout=120)[0]
    finally:
        child.kill()
    assert child.returncode == 130, output
    stopped = max(losses(run_dir))
    assert stopped < STEPS, output
    assert (run_dir / f"checkpoint-{stopped}" / "training_state.pt").is_file()
    assert f"Stopped by SIGINT after step {stopped}" in output and "--resume" in output, output
    assert not (run_dir / "summary.json").exists()

    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert losses(run_dir) == losses(straight)
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final")


def send_signals_during_step(monkeypatch, *plan: tuple[int, int]) -> None:
    """Deliver real signals to this process while micro batch n runs: plan = (micro batch number, signal)."""
    real = finetune.objectives.base.token_loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch):
        if model.training:
            calls["n"] += 1
            for n, signum in plan:
                if n == calls["n"]:
                    os.kill(os.getpid(), signum)
        return real(model, batch)

    monkeypatch.setattr(finetune.objectives.base, "token_loss_sum", loss_sum)


def test_sigterm_finishes_the_step_then_exits_143(tmp_path, tiny_model_dir, data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_model_dir, data)
    run_dir = tmp_path / "runs" / "run"
    send_signals_during_step(monkeypatch, (3, signal.SIGTERM))  # first micro batch of step 2
    result = train(recipe)
    assert result.exit_code == 143, result.output
    assert "Stopped by SIGTERM after step 2" in result.output
    assert max(losses(run_dir)) == 2  # the step in flight was completed, not lost
    assert json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2


def test_second_sigint_during_the_save_exits_at_once_and_keeps_the_last_checkpoint(
    tmp_path, tiny_model_dir, data, monkeypatch
):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, save_steps=2)
    run_dir = tmp_path / "runs" / "run"
    send_signals_during_step(monkeypatch, (7, signal.SIGINT))  # during step 4
    real_save = torch.save

    def save_and_get_interrupted(obj, path, *a, **kw):
        real_save(obj, path, *a, **kw)
        if "checkpoint-4" in str(path):
            os.kill(os.getpid(), signal.SIGINT)  # impatient user: a second Ctrl-C while checkpoint-4 is written
            time.sleep(0.1)

    monkeypatch.setattr(torch, "save", save_and_get_interrupted)
    result = train(recipe)
    assert result.exit_code == 130, result.output
    names = sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-2"]  # checkpoint-4 never appeared, and no temporary directory is left over
    monkeypatch.undo()
    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert "checkpoint-2" in flat(result.output)


def test_a_kill_while_saving_never_leaves_a_checkpoint_that_resume_would_pick(
    straight, tmp_path, tiny_model_dir, data, monkeypatch
):
    """Simulate SIGKILL halfway through writing checkpoint-4: no cleanup code runs, half a file stays on disk."""
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2, save_steps=2)
    run_dir = tmp_path / "runs" / "run"
    with monkeypatch.context() as m:
        real_save = torch.save

        def die_mid_write(obj, path, *a, **kw):
            if "checkpoint-4" not in str(path):
                return real_save(obj, path, *a, **kw)
            Path(path).write_bytes(b"PK\x03\x04 half a zip file")
            m.setattr(shutil, "rmtree", lambda *a, **kw: None)  # a killed process runs no clean-up code
            raise KeyboardInterrupt

        m.setattr(torch, "save", die_mid_write)
        assert train(recipe).exit_code == 130
    leftovers = sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name)
    assert leftovers == [".tmp-checkpoint-4", "checkpoint-2"]
    assert max(losses(run_dir)) == 4  # steps 3 and 4 were logged before the crash

    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resumingfrom{run_dir / 'checkpoint-2'}atstep2" in flat(result.output)
    assert not list(run_dir.glob(".tmp-*"))
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, STEPS + 1))  # no duplicate lines
    assert losses(run_dir) == losses(straight)
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final")


def test_save_total_limit_keeps_the_newest_and_the_best(tmp_path, tiny_model_dir, data, monkeypatch):
    scripted = iter([3.0, 1.0, 2.0, 2.5, 2.6, 2.7])  # eval loss after steps 1..6: the best is step 2
    monkeypatch.setattr(finetune.train.events, "eval_objective", lambda *a, **kw: {"loss": next(scripted)})
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=1, save_steps=1, save_total_limit=2, keep_best=True)
    run_dir = tmp_path / "runs" / "run"
    assert train(recipe).exit_code == 0
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-5", "checkpoint-final"]
    state = json.loads((run_dir / "checkpoint-final" / "trainer_state.json").read_text())
    assert state["best_eval_loss"] == 1.0 and Path(state["best_checkpoint"]).name == "checkpoint-2"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["best_checkpoint"]).name == "checkpoint-2" and summary["eval_loss"] == 2.7


@pytest.mark.parametrize("limit", [6000, 30_000], ids=["adapter-write-fails", "optimizer-state-write-fails"])
def test_a_full_disk_at_save_time_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, tiny_model_dir, data, monkeypatch, limit
):
    """Real write failures, raised by each writer its own way (safetensors, torch.save, open): while checkpoint-4
    is saved, no file may grow past `limit` bytes (RLIMIT_FSIZE: writes fail with EFBIG, much as with ENOSPC).
    The adapter file is 8 KiB (its README 5 KiB), training_state.pt 35 KiB."""
    recipe = make_recipe(tmp_path, tiny_model_dir, data, save_steps=2, save_total_limit=1)
    run_dir = tmp_path / "runs" / "run"
    real_save = finetune.train.checkpoint.save_checkpoint

    def save_on_a_full_disk(path, *args, **kwargs):
        if path.name != "checkpoint-4":
            return real_save(path, *args, **kwargs)
        before = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
        try:
            return real_save(path, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, before)

    monkeypatch.setattr(finetune.train.checkpoint, "save_checkpoint", save_on_a_full_disk)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
    try:
        result = train(recipe)
    finally:
        signal.signal(signal.SIGXFSZ, previous)
    assert result.exit_code == 2, result.output
    assert f"Cannotwrite{run_dir / 'checkpoint-4'}" in flat(result.output) and "intact" in result.output
    assert "Traceback" not in result.output
    # checkpoint-2 is kept although save_total_limit=1: it is deleted only once checkpoint-4 is complete
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert find_resume_checkpoint(run_dir, "latest") == run_dir / "checkpoint-2"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model_dir, data):
    """A run that died right after writing checkpoint-2."""
    tmp = tmp_path_factory.mktemp("interrupted")
    recipe = make_recipe(tmp, tiny_model_dir, data, save_steps=2)
    with pytest.MonkeyPatch.context() as m:
        stop_after_save(m, 2)
        assert train(recipe).exit_code == 130
    return recipe, tmp / "runs" / "run"


def test_run_dir_and_checkpoints_record_the_recipe_and_environment(interrupted):
    from finetune.recipe.file import load_recipe

    recipe, run_dir = interrupted
    checkpoint = run_dir / "checkpoint-2"
    for where in (run_dir, checkpoint):
        assert load_recipe(where / "recipe.yaml") == load_recipe(recipe)  # the resolved recipe, loadable as is
        env = json.loads((where / "environment.json").read_text())
        assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate"} <= set(env["versions"])
        assert env["versions"]["peft"] == version("peft")
        assert env["device"].startswith("cpu") and len(env["data_fingerprint"]) == 16 and "git_commit" in env
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state | {"best_checkpoint": None} == {
        "step": 2, "epoch": 0, "micro_in_epoch": 4, "epochs_done": 0.8, "total_steps": STEPS, "recipe": "run",
        "best_eval_loss": None, "best_checkpoint": None, "skipped_steps": []}


@pytest.mark.parametrize(("override", "message"), [
    ("lora.r=8", "lora.r changed (4 -> 8)"),
    ("data.max_length=24", "data.max_length 32 -> 24"),
    ("data.train=OTHER", "data.train ["),
])
def test_resume_refuses_other_data_or_adapter_shape(interrupted, tmp_path, toy_alpaca_rows, override, message):
    recipe, run_dir = interrupted
    if "OTHER" in override:
        write_jsonl(tmp_path / "other.jsonl", toy_alpaca_rows[1 : ROWS + 1])
        override = override.replace("OTHER", str(tmp_path / "other.jsonl"))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    result = runner.invoke(app, ["train", str(recipe), override, "--resume"])
    assert result.exit_code == 2, result.output
    assert "Refusing to resume" in result.output and message in result.output
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing touched


def copy_with_saved_environment(run_dir: Path, to: Path, change) -> Path:
    shutil.copytree(run_dir, to)
    env_file = to / "checkpoint-2" / "environment.json"
    env = json.loads(env_file.read_text())
    change(env)
    env_file.write_text(json.dumps(env))
    write_manifest(to / "checkpoint-2")  # as if written in that environment: the manifest matches it
    return to


def test_resume_refuses_changed_data_file_contents(interrupted, tmp_path):
    recipe, run_dir = interrupted
    copy = copy_with_saved_environment(run_dir, tmp_path / "copy", lambda env: env.update(data_fingerprint="0" * 16))
    result = runner.invoke(app, ["train", str(recipe), f"output_dir={copy}", "--resume"])
    assert result.exit_code == 2, result.output
    assert "training data changed" in result.output and "the contents of the data files" in result.output


def test_resume_refuses_a_dropout_stream_it_does_not_know(interrupted, tmp_path):
    """environment.json says how the run drew LoRA's dropout; a value this version cannot draw is named, exit 2."""
    recipe, run_dir = interrupted
    assert json.loads((run_dir / "checkpoint-2" / "environment.json").read_text())["lora_dropout_masks"] == "positions"
    copy = copy_with_saved_environment(run_dir, tmp_path / "copy", lambda env: env.update(lora_dropout_masks="dice"))
    result = runner.invoke(app, ["train", str(recipe), f"output_dir={copy}", "--resume"])
    assert result.exit_code == 2, result.output
    assert "lora_dropout_masks is 'dice'" in " ".join(result.output.split()) and "Traceback" not in result.output


def test_resume_warns_about_other_library_versions(interrupted, tmp_path):
    recipe, run_dir = interrupted
    copy = copy_with_saved_environment(run_dir, tmp_path / "copy", lambda env: env["versions"].update(peft="0.1.0"))
    result = runner.invoke(app, ["train", str(recipe), f"output_dir={copy}", "--resume"])
    assert result.exit_code == 0, result.output
    assert "library versions differ" in result.output and "peft 0.1.0 ->" in result.output
    assert sorted(losses(copy)) == list(range(1, STEPS + 1))


def test_a_first_sigint_during_the_final_save_lets_the_run_finish(tmp_path, tiny_model_dir, data, monkeypatch):
    real = finetune.train.events.eval_objective

    def final_eval_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune.train.events, "eval_objective", final_eval_interrupted)
    result = train(make_recipe(tmp_path, tiny_model_dir, data))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "run" / "summary.json").exists()


def test_a_finished_run_holds_metrics_summary_and_loss_curve(straight):
    train_rows = [m for m in metrics(straight) if "loss" in m]
    assert all({"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"} <= set(m) for m in train_rows)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["eval_loss"] == metrics(straight)[-1]["eval_loss"]
    assert summary["skipped_steps"] == [] and Path(summary["final_checkpoint"]) == straight / "checkpoint-final"
    assert summary["trainable_parameters"] == 2 * 4 * ((64 + 64) + (64 + 32))  # layers x r x (q_proj + v_proj)
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_a_requested_tracker_that_is_not_installed_is_a_recipe_error(tmp_path, tiny_model_dir, data):
    result = train(make_recipe(tmp_path, tiny_model_dir, data, report_to=["tensorboard"]))
    assert result.exit_code == 2, result.output
    assert "pip install tensorboard" in result.output
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_tracker_writes_event_files(tmp_path, tiny_model_dir, data):
    assert train(make_recipe(tmp_path, tiny_model_dir, data, report_to=["tensorboard"])).exit_code == 0
    assert list((tmp_path / "runs" / "run").rglob("events.out.tfevents.*"))


def test_generation_metrics_during_training_leave_training_unchanged(tmp_path, tiny_model_dir, data, straight):
    """exact_match every N steps comes from the same code as `finetune eval`, and generating must not
    consume the dropout RNG: the losses equal those of the same run without it."""
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2, eval_generate_steps=3,
                         eval_generate_examples=3, eval_max_new_tokens=4)
    result = train(recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "run"
    generated = [m for m in metrics(run) if "eval_exact_match" in m]
    assert [m["step"] for m in generated] == [3, STEPS]
    assert all(0 <= m["eval_exact_match"] <= 1 and 0 <= m["eval_contains"] <= 1 for m in generated)
    assert losses(run) == losses(straight)
