"""finetune/model/allocator.py: `finetune train` (and the decoding verbs) on CPU re-execute themselves once under tcmalloc
where it is installed."""

import json
import os
import subprocess
import sys

import pytest
from conftest import write_jsonl
from test_training import make_recipe

from finetune.model import allocator as allocator
from finetune.model.allocator import AllocatorError, reexec_command


@pytest.fixture
def tcmalloc_here(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/opt/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "allocator_in_use", lambda: "glibc")
    monkeypatch.setattr(allocator, "cpu_only", lambda env=None: True)


def test_train_on_cpu_reexecutes_once_with_tcmalloc_preloaded(tcmalloc_here):
    argv = ["/venv/bin/finetune", "--debug", "train", "r.yaml", "training.max_steps=2"]
    args, env = reexec_command(argv, {"LD_PRELOAD": "/other.so", "PATH": "/bin"})
    assert args == [sys.executable, "-m", "finetune", "--debug", "train", "r.yaml", "training.max_steps=2"]
    assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc_minimal.so.4:/other.so" and env["PATH"] == "/bin"
    assert reexec_command(argv, env) is None  # the re-executed process goes on: never a second time


def test_only_the_verbs_that_train_or_decode_and_only_when_asked(tcmalloc_here, monkeypatch):
    for verb in ("chat", "serve", "eval"):  # decoding allocates small tensors every token (docs/performance.md)
        args, env = reexec_command(["finetune", verb, "runs/x/checkpoint-final"], {})
        assert args[-2:] == [verb, "runs/x/checkpoint-final"] and env["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4")
    for verb in ("merge", "export", "plan", "validate", "prepare", "board"):
        assert reexec_command(["finetune", verb, "r.yaml"], {}) is None
    assert reexec_command(["finetune", "train", "r.yaml"], {"FINETUNE_ALLOCATOR": "glibc"}) is None
    monkeypatch.setattr(allocator, "cpu_only", lambda env=None: False)  # a GPU machine: auto leaves it alone
    assert reexec_command(["finetune", "train", "r.yaml"], {}) is None
    assert reexec_command(["finetune", "train", "r.yaml"], {"FINETUNE_ALLOCATOR": "tcmalloc"}) is not None
    monkeypatch.setattr(allocator, "allocator_in_use", lambda: "jemalloc")  # the user preloaded another allocator
    assert reexec_command(["finetune", "train", "r.yaml"], {"FINETUNE_ALLOCATOR": "tcmalloc"}) is None


def test_missing_tcmalloc_is_fine_for_auto_and_an_error_when_required(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator, "allocator_in_use", lambda: "glibc")
    assert reexec_command(["finetune", "train", "r.yaml"], {}) is None
    with pytest.raises(AllocatorError, match="apt install libtcmalloc-minimal4"):
        reexec_command(["finetune", "train", "r.yaml"], {"FINETUNE_ALLOCATOR": "tcmalloc"})
    with pytest.raises(AllocatorError, match="FINETUNE_ALLOCATOR is 'fast'; expected one of auto, tcmalloc, glibc"):
        reexec_command(["finetune", "train", "r.yaml"], {"FINETUNE_ALLOCATOR": "fast"})


def test_the_real_command_trains_under_the_allocator_it_records(tmp_path, tiny_model_dir, toy_alpaca_rows):
    """`python -m finetune train` end to end: under tcmalloc where installed (environment.json says so), else
    with FINETUNE_ALLOCATOR=tcmalloc a one-paragraph error and exit 2; a bad value is exit 2 without traceback."""
    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows[:16])
    write_jsonl(tmp_path / "eval.jsonl", toy_alpaca_rows[:4])
    recipe = make_recipe(tmp_path, tiny_model_dir, tmp_path, max_steps=1)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARK)}

    def run(value):
        return subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe), "--overwrite"],
                              env={**env, "FINETUNE_ALLOCATOR": value}, capture_output=True, text=True, timeout=300)

    bad = run("fast")
    assert bad.returncode == 2 and "FINETUNE_ALLOCATOR is 'fast'" in bad.stderr and "Traceback" not in bad.stderr
    done = run("tcmalloc")
    if allocator.find_tcmalloc() is None:
        assert done.returncode == 2 and "no tcmalloc library was found" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "runs" / "run" / "environment.json").read_text())
    assert record["allocator"] == "tcmalloc"
    assert run("glibc").returncode == 0
    assert json.loads((tmp_path / "runs" / "run" / "environment.json").read_text())["allocator"] == "glibc"
