"""The embedded default model (SmolLM2-135M-Instruct, fetched by `make fetch`) through the real CLI.

Slow (minutes on a CPU): run with `make test-slow`. It checks what tiny random models cannot: a real
chat template and tokenizer, the quickstart recipe as shipped, and a real merge.
"""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="run `make fetch` first"),
]


def test_quickstart_learns_and_merges(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the project root
    runner = CliRunner()
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "training.max_steps=8", "training.eval_steps=8", "training.save_steps=8",
                 "training.logging_steps=2", "training.micro_batch_size=4"]
    result = runner.invoke(app, ["train", "recipes/quickstart.yaml", *overrides])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0], losses

    result = runner.invoke(app, ["eval", "recipes/quickstart.yaml", *overrides, "--adapter", str(out / "checkpoint-final"),
                                 "--compare", "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    base, tuned = (m["metrics"]["loss"] for m in report["models"].values())
    assert tuned < base, report["models"]

    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(out / "checkpoint-final"), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template and torch.isfinite(model(**tok("hello", return_tensors="pt")).logits).all()
