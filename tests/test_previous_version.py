"""A run directory written by the previous version (the flat-module layout, commit fae5093) still works.

tests/data/previous_run is that version's run of a 4-step 4-bit recipe on the tiny model (conftest's, seeded),
kept with checkpoint-2 and checkpoint-final: this version verifies its manifests, resumes it from step 2 to the
same final adapter, and evaluates and merges its checkpoint.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app

from conftest import write_jsonl

PREVIOUS = Path(__file__).parent / "data" / "previous_run"
runner = CliRunner()


DATA = Path("/tmp/finetune-previous-run")  # where the previous run read its data (resume checks the paths too)


def recipe(tmp_path: Path, model_dir: Path, toy_alpaca_rows, name: str) -> Path:
    """The previous run's recipe (as it saved it), pointed at this session's tiny model; the same data files."""
    import yaml

    DATA.mkdir(exist_ok=True)
    write_jsonl(DATA / "train.jsonl", toy_alpaca_rows[:20])
    write_jsonl(DATA / "eval.jsonl", toy_alpaca_rows[40:48])
    body = yaml.safe_load((PREVIOUS / "recipe.yaml").read_text())
    body["name"], body["output_dir"] = name, str(tmp_path / "runs" / name)
    body["model"]["name_or_path"] = str(model_dir)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(body))
    return path


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_model_dir, toy_alpaca_rows) -> Path:
    tmp = tmp_path_factory.mktemp("previous")
    path = recipe(tmp, tiny_model_dir, toy_alpaca_rows, "previous")
    (tmp / "runs").mkdir()
    shutil.copytree(PREVIOUS, tmp / "runs" / "previous", ignore=shutil.ignore_patterns("checkpoint-final"))
    result = runner.invoke(app, ["train", str(path), "--resume"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps at the terminal's width, which differs by runner
    assert "resuming from" in output and "at step 2" in output
    return tmp / "runs" / "previous"


def test_previous_checkpoints_verify():
    result = runner.invoke(app, ["verify", str(PREVIOUS)])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok") == 2


def test_resuming_a_previous_checkpoint_gives_its_final_adapter(resumed, tmp_path, tiny_model_dir, toy_alpaca_rows):
    # The stored checkpoint-2 came from another machine's float kernels, so the comparison is within float
    # tolerance (bit-exact resume on one machine is test_resume's job). The previous version drew one dropout
    # mask per adapter; runs begun now share a mask between the adapters reading one input, so the resumed
    # steps keep the previous stream (records.dropout_masks) and end on the previous version's final adapter ...
    final = adapter(resumed / "checkpoint-final")
    old = adapter(PREVIOUS / "checkpoint-final")
    assert old.keys() == final.keys()
    for k in old:
        torch.testing.assert_close(final[k], old[k], atol=1e-5, rtol=0, msg=k)
    assert json.loads((resumed / "checkpoint-final" / "environment.json").read_text())["lora_dropout_masks"] \
        == "per adapter"
    # ... while this version's uninterrupted run of the same recipe draws its own way: another adapter
    straight = recipe(tmp_path, tiny_model_dir, toy_alpaca_rows, "straight")
    result = runner.invoke(app, ["train", str(straight)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "straight"
    assert json.loads((run / "checkpoint-final" / "environment.json").read_text())["lora_dropout_masks"] == "positions"
    fresh = adapter(run / "checkpoint-final")
    assert max((fresh[k] - final[k]).abs().max().item() for k in final) > 1e-4
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    previous = (PREVIOUS / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line) for line in lines]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3, 4]  # the previous lines kept, then 3 and 4
    kept = [line for line in previous if json.loads(line).get("step", 0) <= 2]
    assert lines[:len(kept)] == kept  # byte for byte


def test_previous_adapter_evaluates_and_merges(tmp_path, tiny_model_dir, toy_alpaca_rows):
    path = recipe(tmp_path, tiny_model_dir, toy_alpaca_rows, "eval")
    checkpoint = tmp_path / "checkpoint-final"
    shutil.copytree(PREVIOUS / "checkpoint-final", checkpoint)
    result = runner.invoke(app, ["eval", str(path), "--adapter", str(checkpoint), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["models"]
    result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(tmp_path / "merged"),
                                 "--base", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["fidelity"]["dequantized"]["top1_agreement"] == 1.0
