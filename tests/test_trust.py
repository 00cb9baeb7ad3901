# ruff: noqa: F811  (fixtures imported from test_training are parameters here)
"""Trust under sharing and damage: run locks, verified checkpoints, no code from checkpoints, progress.

The runs are test_training.py's few-step runs of the real CLI on the 2-layer fixture model."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from test_training import (  # noqa: F401  (data, one_thread, straight: fixtures)
    PACED_CLI,
    assert_same_adapter,
    data,
    flat,
    losses,
    make_recipe,
    one_thread,
    runner,
    stop_after_save,
    straight,
    train,
)

from finetune.artifacts import lock as lock
from finetune.cli import app
from finetune.model.load import load_tokenizer
from finetune.recipe.schema import ModelSection
from finetune.artifacts.manifest import write_manifest


def start_paced_train(recipe: Path, cwd: Path, *args: str) -> subprocess.Popen:
    """`finetune train` in a child process whose steps take 0.3 s, so it is alive while the test acts."""
    return subprocess.Popen([sys.executable, "-c", PACED_CLI, "train", str(recipe), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"})


def wait_for_first_metrics(child: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()):
        assert child.poll() is None and time.monotonic() < deadline, child.stdout.read()
        time.sleep(0.05)


def test_a_second_train_on_a_live_run_directory_is_refused_and_touches_nothing(
    tmp_path, tiny_model_dir, data, straight
):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2)  # the straight run's recipe
    run_dir = tmp_path / "runs" / "run"
    first = start_paced_train(recipe, tmp_path)
    try:
        wait_for_first_metrics(first, run_dir)
        for args in ([], ["--overwrite"], ["--resume"]):
            result = train(recipe, *args)
            assert result.exit_code == 2, result.output
            assert f"PID{first.pid}" in flat(result.output) and "isinuse" in flat(result.output), result.output
        output = first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert first.returncode == 0, output
    assert losses(run_dir) == losses(straight)  # the first run never noticed
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final")
    result = runner.invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 0 and "damaged" not in result.output, result.output
    assert lock.holder(run_dir) is None  # released cleanly: no record left


def test_a_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, tiny_model_dir, data):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, max_steps=2)
    run_dir = tmp_path / "runs" / "run"
    child = start_paced_train(recipe, tmp_path)
    try:
        wait_for_first_metrics(child, run_dir)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
    assert lock.holder(run_dir)["pid"] == child.pid  # the record a killed process leaves behind
    result = train(recipe, "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"tookoverthelockof{run_dir}" in flat(result.output) and f"PID{child.pid}" in flat(result.output)
    assert "thatprocessisgone" in flat(result.output)


def test_eval_refuses_a_report_path_another_command_is_writing(tmp_path, tiny_model_dir, data):
    out = tmp_path / "eval.json"
    with lock.hold(out, "finetune eval"):
        result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(data / "eval.jsonl"),
                                     "--json", str(out)])
    assert result.exit_code == 2, result.output
    assert f"PID{os.getpid()}" in flat(result.output) and not out.exists()


@pytest.fixture
def stopped_at_4(tmp_path, tiny_model_dir, data, monkeypatch):
    """A run killed right after checkpoint-4 (checkpoint-2 before it), with the straight run's recipe."""
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2, save_steps=2)
    with monkeypatch.context() as m:
        stop_after_save(m, 4)
        assert train(recipe).exit_code == 130
    return recipe, tmp_path / "runs" / "run"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_bit], ids=["truncated", "bit-flip"])
def test_resume_names_a_damaged_checkpoint_and_continues_from_the_previous_one(
    stopped_at_4, straight, tiny_model_dir, data, tmp_path, damage
):
    recipe, run_dir = stopped_at_4
    damaged = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    damage(damaged)
    for args in (["eval", "--model", str(tiny_model_dir), "--adapter", str(damaged.parent),
                  "--data", str(data / "eval.jsonl")],
                 ["merge", str(damaged.parent), "--out", str(tmp_path / "merged")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and str(damaged) in flat(result.output), result.output
    result = runner.invoke(app, ["verify", str(run_dir)])
    assert result.exit_code == 2 and str(damaged) in flat(result.output), result.output

    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    expected = "bytes,expected" if damage is truncate else "hassha256"
    assert f"warning:checkpoint-4isdamaged:{damaged}" in flat(result.output) and expected in flat(result.output)
    assert "Resumingfromcheckpoint-2,thenewestintactcheckpoint,instead" in flat(result.output)
    assert losses(run_dir) == losses(straight)
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final", atol=0)


def test_resume_with_every_checkpoint_damaged_exits_2(stopped_at_4):
    recipe, run_dir = stopped_at_4
    for step in (2, 4):
        truncate(run_dir / f"checkpoint-{step}" / "training_state.pt")
    result = train(recipe, "--resume")
    assert result.exit_code == 2, result.output
    assert "everycheckpointisdamaged" in flat(result.output) and "checkpoint-2/training_state.pt" in flat(result.output)


def test_an_adapter_without_manifest_loads_and_a_corrupt_one_is_named(stopped_at_4, tiny_model_dir, data, tmp_path):
    _, run_dir = stopped_at_4
    third_party = run_dir / "checkpoint-2"
    (third_party / "manifest.json").unlink()
    args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(third_party), "--data", str(data / "eval.jsonl")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    truncate(third_party / "adapter_model.safetensors")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{third_party / 'adapter_model.safetensors'}" in flat(result.output) and "truncated" in result.output


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do (or worse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_training_state_carrying_a_pickle_payload_is_refused_and_never_runs(stopped_at_4, tmp_path):
    recipe, run_dir = stopped_at_4
    marker = tmp_path / "payload-ran"
    checkpoint = run_dir / "checkpoint-4"
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    torch.save({**state, "scheduler": Payload(marker)}, checkpoint / "training_state.pt")
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)  # an attacker would write a matching manifest
    before = (run_dir / "metrics.jsonl").read_text()
    result = train(recipe, "--resume")
    assert result.exit_code == 2, result.output
    assert "Refusingtoresume" in flat(result.output) and "couldrunarbitrarycode" in flat(result.output)
    assert not marker.exists()
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing ran
    assert not (run_dir / "checkpoint-final").exists()


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_off_unless_the_recipe_sets_it(tiny_model_dir, monkeypatch, trust):
    import transformers

    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    monkeypatch.setattr("finetune.model.load.AutoTokenizer.from_pretrained", spy)
    section = ModelSection(name_or_path=str(tiny_model_dir), **({"trust_remote_code": True} if trust else {}))
    load_tokenizer(section)
    assert seen["trust_remote_code"] is trust


def test_eval_progress_reaches_a_pipe_before_the_end(tmp_path, tiny_model_dir, toy_alpaca_rows):
    """Without a terminal, progress comes as plain lines on stderr (results stay on stdout)."""
    write_jsonl(tmp_path / "eval.jsonl", toy_alpaca_rows[:24])
    child = subprocess.Popen(
        [sys.executable, "-m", "finetune", "eval", "--model", str(tiny_model_dir), "--data",
         str(tmp_path / "eval.jsonl"), "--generate", "-1", "--max-new-tokens", "24", "--batch-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_PROGRESS_INTERVAL": "0.5"},
    )
    try:
        seen = []
        while not any(line.startswith("generate (model): ") for line in seen):  # its first line, at the start
            seen.append(child.stderr.readline())
            assert seen[-1], seen  # EOF before any progress
        running = child.poll() is None
        rest, more = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, "".join(seen) + more
    lines = seen + more.splitlines()
    assert running, lines  # progress came while the generation was still going
    assert any(line.startswith("generate (model): 24/24 examples (100%)") and "tokens/s" in line for line in lines)
    assert any(line.startswith("loss (model): ") for line in lines)
    assert not any("\r" in line or "\x1b[" in line for line in lines)  # no redrawing without a terminal
    assert "exact_match" in rest and "examples/s" not in rest  # results on stdout, progress on stderr


def test_merge_of_an_adapter_without_tokenizer_files_uses_the_base_tokenizer(stopped_at_4, tmp_path):
    _, run_dir = stopped_at_4
    adapter_dir = tmp_path / "third-party"
    shutil.copytree(run_dir / "checkpoint-2", adapter_dir)
    for f in adapter_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or f.name == "manifest.json":
            f.unlink()
    out = tmp_path / "merged"
    with lock.hold(out, "finetune merge --out"):  # another merge writing there: refused
        result = runner.invoke(app, ["merge", str(adapter_dir), "--out", str(out)])
    assert result.exit_code == 2 and f"PID{os.getpid()}" in flat(result.output), result.output
    result = runner.invoke(app, ["merge", str(adapter_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{adapter_dir}hasnotokenizerfiles:usedthebasemodel's" in flat(result.output)
    assert (out / "tokenizer.json").is_file()
