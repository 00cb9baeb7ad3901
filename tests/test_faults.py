# ruff: noqa: F811  (fixtures imported from test_training are parameters here)
"""Faults injected into the real CLI: disk full (ENOSPC) in the middle of a checkpoint, merge or export write, out
of memory in a training step, the fsync order that makes a published output survive power loss, and (slow) SIGKILL
at random moments of `finetune train`, resumed each time. Each: a clear message, the exit code, the previous output
intact, and a resume that ends exactly where an uninterrupted run does. docs/reliability.md is the table."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_training import (  # noqa: F401  (data, one_thread, straight: fixtures)
    assert_same_adapter,
    data,
    flat,
    losses,
    make_recipe,
    one_thread,
    runner,
    straight,
    train,
)

import finetune.train.checkpoint
import finetune.train.loop
from finetune.artifacts import atomic_dir, atomic_file
from finetune.cli import app

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ publish order


def record_io(monkeypatch) -> list[tuple[str, str]]:
    """Patch os.fsync and os.replace to log (call, path) in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", f"{a} -> {b}"))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc (Linux)")
def test_files_then_rename_then_directory_are_fsynced_in_that_order(tmp_path, monkeypatch):
    events = record_io(monkeypatch)
    final = tmp_path / "checkpoint-2"
    with atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "b.json").write_text("{}")
    with atomic_file(tmp_path / "out.gguf") as partial:
        partial.write_bytes(b"GGUF")
    tmp = str(tmp_path / ".tmp-checkpoint-2")
    partial = str(tmp_path / f".out.gguf.partial-{os.getpid()}")
    assert events == [
        ("fsync", f"{tmp}/a.bin"), ("fsync", f"{tmp}/b.json"), ("fsync", tmp),  # data, then the directory entries
        ("replace", f"{tmp} -> {final}"), ("fsync", str(tmp_path)),  # published, then the rename made durable
        ("fsync", partial), ("replace", f"{partial} -> {tmp_path / 'out.gguf'}"), ("fsync", str(tmp_path)),
    ]


# ------------------------------------------------------------------ disk full, out of memory, during training


def fail_checkpoint_write(monkeypatch, step: int) -> None:
    """training_state.pt of checkpoint-<step> gets half written, then the disk is full."""
    real = finetune.train.checkpoint.torch.save

    def save(obj, path, *args, **kwargs):
        if Path(path).parent.name == f".tmp-checkpoint-{step}":
            Path(path).write_bytes(b"\0" * 1000)
            raise ENOSPC
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(finetune.train.checkpoint.torch, "save", save)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resume_is_exact(
        straight, tmp_path, tiny_model_dir, data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2, save_steps=2)
    run_dir = tmp_path / "runs" / "run"
    with monkeypatch.context() as m:
        fail_checkpoint_write(m, 4)
        result = train(recipe)
    assert result.exit_code == 2, result.output
    assert f"Cannotwrite{run_dir / 'checkpoint-4'}:Nospaceleftondevice" in flat(result.output)
    assert "Earliercheckpointsareintact" in flat(result.output) and "Traceback" not in result.output
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".tmp", "checkpoint"))) == ["checkpoint-2"]
    assert runner.invoke(app, ["verify", str(run_dir)]).exit_code == 0
    result = train(recipe, "--resume")  # space freed
    assert result.exit_code == 0, result.output
    assert losses(run_dir) == losses(straight)
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final", atol=0)


def test_out_of_memory_in_a_step_exits_4_with_advice_and_resume_is_exact(
        straight, tmp_path, tiny_model_dir, data, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2, save_steps=2)
    run_dir = tmp_path / "runs" / "run"
    real, calls = finetune.train.loop.train_step, {"n": 0}

    def step(run, group):
        calls["n"] += 1
        if calls["n"] == 3:  # as the CPU allocator reports it, e.g. under RLIMIT_AS
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes")
        return real(run, group)

    with monkeypatch.context() as m:
        m.setattr(finetune.train.loop, "train_step", step)
        result = train(recipe)
    assert result.exit_code == 4, result.output
    out = flat(result.output)
    assert "Outofmemoryintrainingstep3" in out and "Lowertraining.micro_batch_size" in out and "data.max_length" in out
    assert "Traceback" not in result.output
    assert runner.invoke(app, ["verify", str(run_dir)]).exit_code == 0  # checkpoint-2, whole
    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert losses(run_dir) == losses(straight)
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final", atol=0)


# ------------------------------------------------------------------ disk full during merge and export


def test_disk_full_during_merge_and_export_keeps_the_previous_output(straight, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import finetune.export.gguf
    import finetune.merge.output

    adapter = straight / "checkpoint-final"
    merged, gguf_file = tmp_path / "merged", tmp_path / "m.gguf"
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(merged)]).exit_code == 0
    result = runner.invoke(app, ["export", str(merged), "--out", str(gguf_file), "--type", "f32"])
    assert result.exit_code == 0, result.output
    before_dir, before_file = tree(merged), gguf_file.read_bytes()

    real_write, written = finetune.merge.output.SafetensorsWriter.write, {"n": 0}

    def write(self, name, tensor):
        written["n"] += 1
        if written["n"] == 3:
            raise ENOSPC
        return real_write(self, name, tensor)

    real_gguf = finetune.export.gguf.write_gguf

    def write_gguf(model_dir, path, type, console=None):
        Path(path).write_bytes(before_file[: len(before_file) // 2])
        raise ENOSPC

    with monkeypatch.context() as m:
        m.setattr(finetune.merge.output.SafetensorsWriter, "write", write)
        result = runner.invoke(app, ["merge", str(adapter), "--out", str(merged), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert f"Cannotwrite{merged}:Nospaceleftondevice" in flat(result.output)
    assert "Thepreviouscontentsof" in flat(result.output) and "Traceback" not in result.output
    with monkeypatch.context() as m:
        m.setattr(finetune.export.gguf, "write_gguf", write_gguf)
        result = runner.invoke(app, ["export", str(merged), "--out", str(gguf_file), "--type", "f32", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert f"Cannotwrite{gguf_file}:Nospaceleftondevice" in flat(result.output)
    assert "Thepreviousm.ggufisintact" in flat(result.output)
    assert tree(merged) == before_dir and gguf_file.read_bytes() == before_file
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "m.gguf", ".merged.lock", ".m.gguf.lock",
                                                                 "export_report.json"])
    assert real_gguf is finetune.export.gguf.write_gguf


@pytest.mark.slow
def test_a_real_file_size_limit_during_export_is_exit_2_and_keeps_the_previous_file(straight, tmp_path):
    """Not patched: the child runs under RLIMIT_FSIZE (half the GGUF's size, SIGXFSZ ignored, so the write fails
    with EFBIG as on a full disk)."""
    pytest.importorskip("gguf")
    import resource

    merged, gguf_file = tmp_path / "merged", tmp_path / "m.gguf"
    assert runner.invoke(app, ["merge", str(straight / "checkpoint-final"), "--out", str(merged)]).exit_code == 0
    assert runner.invoke(app, ["export", str(merged), "--out", str(gguf_file), "--type", "f32"]).exit_code == 0
    before = gguf_file.read_bytes()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "finetune", "export", str(merged), "--out", str(gguf_file), "--type",
                          "f32", "--overwrite"], cwd=tmp_path, env=env, preexec_fn=limit, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 2, out.stdout + out.stderr
    err = " ".join(out.stderr.split())  # the buffered writer reports the short write: "32768 requested and N written"
    assert f"Cannot write {gguf_file}:" in err and "Is the disk full" in err and "The previous m.gguf is intact" in err
    assert "Traceback" not in out.stderr and gguf_file.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    print("fault RLIMIT_FSIZE during export: 1 run, exit 2, previous GGUF byte-identical")


# ------------------------------------------------------------------ SIGKILL at random moments (slow)

KILLS = int(os.environ.get("FINETUNE_KILLS", "8"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bit_identical(straight, tmp_path, tiny_model_dir, data):
    """KILLS times (seeded): start or resume `finetune train` in a child process, SIGKILL it after a random delay
    (during model load, a step, a checkpoint write or the final save), and check that the run directory verifies
    and holds no partial checkpoint under a final name. Then one resume to the end: bit-identical to `straight`."""
    recipe = make_recipe(tmp_path, tiny_model_dir, data, eval_steps=2, save_steps=1)
    run_dir = tmp_path / "runs" / "run"
    rng = random.Random(2026)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    kills = 0
    for i in range(KILLS):
        resume = ["--resume"] if any(run_dir.glob("checkpoint-*")) else ["--overwrite"]
        child = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(recipe), *resume], cwd=tmp_path,
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 12.0))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
        if (run_dir / "checkpoint-final").is_dir():
            shutil.rmtree(run_dir / "checkpoint-final")  # finished before the kill: take a step back, kill again
        if any(run_dir.glob("checkpoint-*")):
            result = runner.invoke(app, ["verify", str(run_dir)])
            assert result.exit_code == 0, result.output
    result = train(recipe, "--resume" if any(run_dir.glob("checkpoint-*")) else "--overwrite")
    assert result.exit_code == 0, result.output
    assert_same_adapter(run_dir / "checkpoint-final", straight / "checkpoint-final", atol=0)
    assert losses(run_dir) == losses(straight)
    print(f"fault SIGKILL during train: {KILLS} runs, {kills} killed, every resume started, final adapter identical")


@pytest.mark.slow
def test_sigkill_during_merge_and_export_leaves_the_previous_output_or_none(straight, tmp_path):
    """KILLS times each (seeded delays): SIGKILL `merge --overwrite` / `export --overwrite` in a child process; the
    final name then holds the previous complete output (byte-identical) or the new complete one, never a part."""
    pytest.importorskip("gguf")
    adapter = straight / "checkpoint-final"
    merged, gguf_file = tmp_path / "merged", tmp_path / "m.gguf"
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(merged)]).exit_code == 0
    assert runner.invoke(app, ["export", str(merged), "--out", str(gguf_file), "--type", "f32"]).exit_code == 0
    def weights(path: Path) -> dict[str, bytes]:  # merge_report.json holds the wall time: not compared
        return {k: v for k, v in tree(path).items() if k != "merge_report.json"}

    complete_dir, complete_file = weights(merged), gguf_file.read_bytes()
    rng = random.Random(7)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outcomes = {"killed": 0, "finished": 0}
    for i in range(KILLS):
        for args, check in (
                (["merge", str(adapter), "--out", str(merged), "--overwrite"],  # killed between its two renames:
                 lambda: weights(merged if merged.exists() else tmp_path / ".old-merged") == complete_dir),  # restored next
                (["export", str(merged), "--out", str(gguf_file), "--type", "f32", "--overwrite"],
                 lambda: gguf_file.read_bytes() == complete_file)):
            if not merged.exists():  # what the next merge's atomic_dir does first; export reads merged
                assert runner.invoke(app, ["merge", str(adapter), "--out", str(merged), "--overwrite"]).exit_code == 0
            child = subprocess.Popen([sys.executable, "-m", "finetune", *args], cwd=tmp_path, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(2.0, 40.0))
            killed = child.poll() is None
            if killed:
                child.send_signal(signal.SIGKILL)
            child.wait()
            outcomes["killed" if killed else "finished"] += 1
            assert check(), f"{args[0]} killed after a random delay left a partial output"
    print(f"fault SIGKILL during merge/export: {2 * KILLS} runs, {outcomes['killed']} killed, "
          f"{outcomes['finished']} finished, final names always complete")
