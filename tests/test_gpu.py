"""The CUDA path, for the first machine with a GPU: `make test-gpu` (skipped without CUDA).

Written before this project had a GPU to run it on, so every test prints what it measured (one
`GPU ...` line each; also collected in runs/gpu-report.json) as well as asserting it:
4-bit layers and their quantization state on the device, bf16 compute chosen by `auto`, paged AdamW
without a CPU fallback, the loss falling, exact resume, peak memory against `finetune plan`, a
merge that reproduces the model trained on the GPU, and DPO's step-1 loss of log 2.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from test_training import make_recipe, metrics, stop_after_save
from typer.testing import CliRunner

from finetune.cli import app

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
REPORT = ROOT / "runs" / "gpu-report.json"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
runner = CliRunner()


def report(name: str, **numbers) -> None:
    print(f"\nGPU {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))
    REPORT.parent.mkdir(exist_ok=True)
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    data[name] = {**numbers, "device": torch.cuda.get_device_name()}
    REPORT.write_text(json.dumps(data, indent=1))


def gpu_recipe(tmp_path, model_dir, data_dir, name, **training):
    """make_recipe's few-step run, on the 4-bit base with the recipe defaults a GPU user gets."""
    path = make_recipe(tmp_path, model_dir, data_dir, name=name, quantization={"load_in_4bit": True},
                       optimizer="paged_adamw_32bit", **training)
    body = json.loads(path.read_text())
    body["quantization"].pop("compute_dtype", None)  # auto
    path.write_text(json.dumps(body))
    return path


@pytest.fixture
def data(tmp_path, toy_alpaca_rows):
    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows[:32])
    write_jsonl(tmp_path / "eval.jsonl", toy_alpaca_rows[40:48])
    return tmp_path


def test_4bit_model_lives_on_the_gpu_and_auto_is_bf16(tiny_model_dir):
    import bitsandbytes as bnb

    from finetune.model import load_base_model
    from finetune.placement import resolve_compute_dtype
    from finetune.recipe import QuantizationSection

    q = QuantizationSection()
    dtype = resolve_compute_dtype("auto")
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model = load_base_model(str(tiny_model_dir), q, "cuda")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" and m.weight.quant_state.absmax.device.type == "cuda"
                          for m in layers)
    assert all(m.compute_dtype == dtype for m in layers)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    report("placement", compute_dtype=str(dtype), layers_4bit=len(layers))


def test_training_on_the_gpu_pages_adamw_learns_and_resumes_exactly(tmp_path, tiny_model_dir, data, monkeypatch,
                                                                     recwarn):
    straight = gpu_recipe(tmp_path / "a", tiny_model_dir, data, "a", max_steps=6)
    result = runner.invoke(app, ["train", str(straight)])
    assert result.exit_code == 0, result.output
    assert not [w for w in recwarn if "paged" in str(w.message).lower()]  # no CPU fallback of the optimizer
    a = tmp_path / "a" / "runs" / "a"
    rows = [r for r in metrics(a) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    resumed = gpu_recipe(tmp_path / "b", tiny_model_dir, data, "b", max_steps=6, save_steps=3)
    with monkeypatch.context() as m:
        stop_after_save(m, 3)
        assert runner.invoke(app, ["train", str(resumed)]).exit_code != 0
    assert runner.invoke(app, ["train", str(resumed), "--resume"]).exit_code == 0
    b = tmp_path / "b" / "runs" / "b"
    la, lb = ([r["loss"] for r in metrics(d) if "loss" in r] for d in (a, b))
    wa, wb = (load_file(d / "checkpoint-final" / "adapter_model.safetensors") for d in (a, b))
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    report("resume", losses_straight=la, losses_resumed=lb, max_adapter_diff=diff)
    assert la == pytest.approx(lb, rel=1e-5) and diff < 1e-5  # CUDA kernels may reorder sums; 1e-5 is their noise


@pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="run `make fetch` first")
def test_quickstart_speed_and_memory_against_the_plan(tmp_path, monkeypatch):
    from finetune.plan import plan
    from finetune.recipe_file import load_recipe

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "training.max_steps=20", "training.eval_steps=20", "training.save_steps=20",
                 "training.logging_steps=5"]
    torch.cuda.reset_peak_memory_stats()
    result = runner.invoke(app, ["train", "recipes/quickstart.yaml", *overrides])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for r in metrics(out) if "loss" in r]
    predicted = plan(load_recipe("recipes/quickstart.yaml", overrides), device="cuda").total / 2**30
    measured = summary["peak_memory_gib"]
    report("quickstart", tokens_per_s=[round(r["tokens_per_s"]) for r in rows], loss=[round(r["loss"], 4) for r in rows],
           eval_loss=summary.get("eval_loss"), peak_gib=round(measured, 3), planned_gib=round(predicted, 3),
           planned_over_measured=round(predicted / measured, 2), wall_s=summary["wall_time_s"])
    assert rows[-1]["loss"] < rows[0]["loss"] / 2
    assert 0.7 < predicted / measured < 1.5, (predicted, measured)


def test_merge_reproduces_the_model_trained_on_the_gpu(tmp_path, tiny_model_dir, data):
    path = gpu_recipe(tmp_path, tiny_model_dir, data, "m", max_steps=3)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(tmp_path / "runs" / "m" / "checkpoint-final"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    fidelity = json.loads((out / "merge_report.json").read_text())["fidelity"]["dequantized"]
    report("merge", **fidelity)
    assert fidelity["max_abs_logit_diff"] < 1e-4 and fidelity["top1_agreement"] == 1.0


def test_dpo_starts_at_log_2_on_the_gpu(tmp_path, tiny_model_dir):
    from test_preference import pref_recipe, preference_rows

    write_jsonl(tmp_path / "train.jsonl", preference_rows(16))
    write_jsonl(tmp_path / "eval.jsonl", preference_rows(4))
    path = pref_recipe(tmp_path, tiny_model_dir, tmp_path, max_steps=2)
    body = json.loads(path.read_text())
    body["quantization"] = {"load_in_4bit": True}
    path.write_text(json.dumps(body))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(tmp_path / "runs" / "dpo") if "loss" in r]
    report("dpo", losses=[r["loss"] for r in rows], memory_gib=rows[-1].get("memory_gib"))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # bf16 reference and policy agree at B = 0

