"""The CUDA path, for the first machine with a GPU: `make test-gpu` (skipped without CUDA; the two-GPU
tests also without a second GPU).

Written before this project had a GPU to run it on, so every test prints what it measured (one
`GPU ...` line each; also collected in runs/gpu-report.json) as well as asserting it:

- on the tiny 2-layer model: 4-bit layers and their quantization state on the device, bf16 compute chosen
  by `auto`; the dequantized weight cache (`quantization.cache_dequantized: true`) against bitsandbytes' own
  forward and backward, bit for bit, and both timed; paged AdamW without a CPU fallback, the loss falling and resume (to CUDA's summation noise);
  exact resume with deterministic algorithms (subprocesses with CUBLAS_WORKSPACE_CONFIG, a run killed after
  a checkpoint then resumed): bit-identical losses and adapter weights; a merge that reproduces the model
  trained on the GPU; DPO's step-1 loss of log 2;
- the quickstart on SmolLM2-135M (after `make fetch`): tokens/s, loss, peak memory against `finetune plan`;
- a random-weight 1.1B Llama in TinyLlama's shape (built once per module, bf16 safetensors): bf16 QLoRA
  through the CLI learns, its peak device memory (torch's allocator + bitsandbytes' paged optimizer state)
  is within 20% of `finetune plan`, and the paged AdamW state lives on the GPU; tokens/s and MFU of QLoRA
  and of plain LoRA on a bf16 base at 512 and 4096 tokens per packed row, against a bf16 matmul peak
  measured here and the spec sheet's (finetune/plan/flops.py counts the model FLOPs);
- on two GPUs: DDP (`--nproc 2`) and FSDP-QLoRA (recipes/accelerate/fsdp_qlora.yaml) against one process
  with the same effective batch, their checkpoints loaded by plain PEFT; losses and wall time.
"""

import gc
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TOY_WORDS, free_port, load_base, write_jsonl
from safetensors.torch import load_file
from test_training import make_recipe, metrics, stop_after_save
from typer.testing import CliRunner

from finetune.cli import app

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
REPORT = ROOT / "runs" / "gpu-report.json"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
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


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def free_gpu_memory() -> int:
    """Collect what earlier runs left, reset the peak counter; return the bytes still allocated (the baseline
    a run's torch.cuda.max_memory_allocated then starts from)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def run_process(name: str, cmd: list[str], cwd: Path, env: dict | None = None, ok=(0,), timeout: int = 400):
    """Run a command; on an unexpected exit code, report its output's tail under `name` and fail.
    Returns (completed process, wall seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300", **(env or {})}
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = round(time.perf_counter() - started, 1)
    if out.returncode not in ok:
        tail = (out.stdout[-1500:] + "\n" + out.stderr[-3000:]).strip()
        report(name, exit_code=out.returncode, wall_s=wall, output_tail=tail)
        pytest.fail(f"{' '.join(cmd[:6])} ... exited {out.returncode}:\n{tail}")
    return out, wall


@pytest.fixture
def data(tmp_path, toy_alpaca_rows):
    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows[:32])
    write_jsonl(tmp_path / "eval.jsonl", toy_alpaca_rows[40:48])
    return tmp_path


def test_4bit_model_lives_on_the_gpu_and_auto_is_bf16(tiny_model_dir):
    import bitsandbytes as bnb

    from finetune.model.placement import resolve_compute_dtype
    from finetune.recipe.schema import QuantizationSection

    q = QuantizationSection()
    dtype = resolve_compute_dtype("auto")
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model = load_base(str(tiny_model_dir), q, "cuda")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" and m.weight.quant_state.absmax.device.type == "cuda"
                          for m in layers)
    assert all(m.compute_dtype == dtype for m in layers)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    report("placement", compute_dtype=str(dtype), layers_4bit=len(layers))


def test_the_weight_cache_gives_bitsandbytes_numbers_on_the_gpu(tiny_model_dir):
    """quantization.cache_dequantized: true on a GPU (auto leaves it off there): every 4-bit layer's output and
    input gradient as bitsandbytes' own, and what a forward and backward of the tiny model take either way."""
    import bitsandbytes as bnb

    from finetune.model import cache_weights
    from finetune.recipe.schema import QuantizationSection

    model = load_base(str(tiny_model_dir), QuantizationSection(), "cuda")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    dtype = layers[0].compute_dtype
    ids = torch.randint(3, model.config.vocab_size, (4, 128), device="cuda")

    def outputs():
        got = []
        for layer in layers:
            x = torch.randn(8, layer.in_features, device="cuda", generator=torch.Generator("cuda").manual_seed(0),
                            requires_grad=True)
            y = layer(x)
            got += [y.detach(), torch.autograd.grad(y.float().square().sum(), x)[0]]
        return got

    def seconds(repeats=20):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(inputs_embeds=embeds).logits.float().mean().backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    plain, plain_s = outputs(), seconds()
    kept = cache_weights(model, dtype)
    cached, cached_s = outputs(), seconds()
    equal = all(torch.equal(a, b) for a, b in zip(plain, cached))
    report("weight cache", compute_dtype=str(dtype), cached_bytes=kept, same_bits=equal,
           step_ms_plain=round(plain_s * 1e3, 2), step_ms_cached=round(cached_s * 1e3, 2))
    assert kept == sum(m.in_features * m.out_features for m in layers) * torch.empty((), dtype=dtype).element_size()
    assert equal


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
    from finetune.plan.memory import plan
    from finetune.recipe.file import load_recipe

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
    report("quickstart", tokens_per_s=[round(r["tokens_per_s"]) for r in rows],
           loss=[round(r["loss"], 4) for r in rows],
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


# ------------------------------------------------------------------- exact resume, deterministic algorithms

# The real CLI with deterministic algorithms on (set before any CUDA work; CUBLAS_WORKSPACE_CONFIG comes from
# the environment). With FINETUNE_TEST_DIE_AFTER=N the process dies right after checkpoint-N is complete, the
# way stop_after_save does in process: the same job as the straight run, cut short like a kill.
DETERMINISTIC_CLI = """
import os, sys
import torch
torch.use_deterministic_algorithms(True)
print(f"deterministic_algorithms={torch.are_deterministic_algorithms_enabled()}", file=sys.stderr)
die_after = os.environ.get("FINETUNE_TEST_DIE_AFTER")
if die_after:
    import finetune.train.checkpoint as checkpoint
    real = checkpoint.save_checkpoint
    def save_then_die(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        if path.name == f"checkpoint-{die_after}":
            raise KeyboardInterrupt
        return out
    checkpoint.save_checkpoint = save_then_die
from finetune.cli import app
app(prog_name="finetune")
"""


def test_resume_is_bit_exact_on_cuda_with_deterministic_algorithms(tmp_path, tiny_model_dir, data):
    """Straight 6 steps vs killed after checkpoint-3 and resumed, each in its own process: the same recipe
    (dropout, 4-bit base, bf16, paged AdamW, an epoch boundary at step 4), identical to the last bit."""
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    cli = [sys.executable, "-c", DETERMINISTIC_CLI, "train"]
    straight = gpu_recipe(tmp_path / "a", tiny_model_dir, data, "a", max_steps=6, save_steps=3)
    resumed = gpu_recipe(tmp_path / "b", tiny_model_dir, data, "b", max_steps=6, save_steps=3)
    first, _ = run_process("resume_deterministic", cli + [str(straight)], tmp_path, env)
    assert "deterministic_algorithms=True" in first.stderr
    run_process("resume_deterministic", cli + [str(resumed)], tmp_path, {**env, "FINETUNE_TEST_DIE_AFTER": "3"},
                ok=(130,))
    b = tmp_path / "b" / "runs" / "b"
    assert max(losses(b)) == 3 and not (b / "checkpoint-final").exists()
    run_process("resume_deterministic", cli + [str(resumed), "--resume"], tmp_path, env)
    a = tmp_path / "a" / "runs" / "a"
    la, lb = losses(a), losses(b)
    ea, eb = ([r["eval_loss"] for r in metrics(d) if "eval_loss" in r] for d in (a, b))
    wa, wb = (load_file(d / "checkpoint-final" / "adapter_model.safetensors") for d in (a, b))
    ca, cb = (load_file(d / "checkpoint-3" / "adapter_model.safetensors") for d in (a, b))
    differing = sorted(k for k in wa if k not in wb or not torch.equal(wa[k], wb[k]))
    diff = max(((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if k in wb), default=float("nan"))
    report("resume_deterministic", losses_straight=list(la.values()), losses_resumed=list(lb.values()),
           eval_straight=ea, eval_resumed=eb, adapter_tensors=len(wa), differing_tensors=len(differing),
           max_adapter_diff=diff)
    assert sorted(la) == list(range(1, 7))
    assert la == lb  # exactly, at every step
    assert ea == eb
    assert wa.keys() == wb.keys() == ca.keys() == cb.keys() and not differing, differing
    assert all(torch.equal(ca[k], cb[k]) for k in ca)  # the two processes agree before the kill too


# -------------------------------------------------------------------------- a 1.1B Llama, random weights

LLAMA_1B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # TinyLlama-1.1B's shape


@pytest.fixture(scope="module")
def llama_1b_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """TinyLlama-1.1B's shape with random weights (initialised on the GPU, saved as bf16 safetensors), with the
    tests' 512-token ChatML tokenizer: ids 512 and up of the 32000-row vocabulary are never used."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(**LLAMA_1B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("llama_1b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype=torch.bfloat16).cpu()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    free_gpu_memory()
    return path


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> Path:
    """64 text records of a random six-word phrase repeated (~5,600 tokens each): learnable, and long enough
    that every packed row of up to 4096 tokens is one full (truncated) record."""
    rng = random.Random(0)
    rows = [{"text": (" ".join(rng.choice(TOY_WORDS) for _ in range(6)) + ". ") * 800} for _ in range(64)]
    path = tmp_path_factory.mktemp("long_text") / "train.jsonl"
    write_jsonl(path, rows)
    return path


def llama_recipe(tmp_path, model_dir, train_file, name, lora=None, quantization=None, data=None, **training):
    """Packed text rows on the 4-bit base with the recipe defaults otherwise (auto bf16, paged AdamW, all-linear
    LoRA r 16, gradient checkpointing); a metrics line per step, no eval, one checkpoint at the end."""
    body = {
        "name": name, "output_dir": str(tmp_path / "runs" / name),
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"load_in_4bit": True, **(quantization or {})},
        "lora": {"r": 16, "alpha": 32, **(lora or {})},
        "data": {"train": str(train_file), "format": "text", "packing": True, "max_length": 512, **(data or {})},
        "training": {"max_steps": 20, "micro_batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 5e-4, "warmup_steps": 2, "logging_steps": 1, "gradient_checkpointing": True,
                     "seed": 0, **training},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(body))
    return path


def step_tokens(row: dict) -> float:
    """Tokens of a metrics line's window (one step at logging_steps 1)."""
    return row["tokens_per_s"] * row["step_s"]


def steady_tokens_per_s(rows: list[dict]) -> float:
    """Tokens over seconds of every step but the first (CUDA and cuBLAS start-up)."""
    steady = rows[1:]
    return sum(step_tokens(r) for r in steady) / sum(r["step_s"] for r in steady)


def optimizer_state_placement(opt) -> dict:
    """Where a bitsandbytes optimizer keeps its state tensors: paged (managed memory from bitsandbytes' page
    manager, a CPU-typed tensor marked is_paged and prefetched to its parameter's GPU), plain CUDA tensors on the
    parameter's device, or anywhere else (misplaced)."""
    import bitsandbytes as bnb

    registered = bnb.functional.GlobalPageManager.get_instance().paged_tensors
    found = {"params": len(opt.state), "paged": 0, "paged_bytes": 0, "on_device": 0, "misplaced": []}
    for p, state in opt.state.items():
        for key, s in state.items():
            if not isinstance(s, torch.Tensor) or s.dim() == 0:
                continue
            if getattr(s, "is_paged", False):
                ok = p.is_cuda and s.page_deviceid == p.device.index and any(t is s for t in registered)
                found["paged"] += ok
                found["paged_bytes"] += s.nbytes if ok else 0
            else:
                ok = p.is_cuda and s.device == p.device
                found["on_device"] += ok
            if not ok:
                where = f"paged for cuda:{s.page_deviceid}" if getattr(s, "is_paged", False) else f"on {s.device}"
                found["misplaced"].append(f"{key} {tuple(s.shape)} {where}, its parameter on {p.device}")
    return found


def test_1b_qlora_learns_fits_the_plan_and_pages_adamw_on_the_gpu(tmp_path, llama_1b_dir, long_text, monkeypatch):
    """20 steps of 4 x 512 tokens. LoRA r 64, so that most adapter matrices have >= 1e5 values: bitsandbytes pages
    the AdamW state of those (cudaMallocManaged; torch's allocator does not see it), and keeps the rest in plain
    CUDA tensors. The device's peak is torch.cuda.max_memory_allocated (summary.json) + the paged state."""
    import finetune.train.setup
    from finetune.plan.memory import plan
    from finetune.recipe.file import load_recipe

    captured = {}
    real_make_optimizer = finetune.train.setup.make_optimizer

    def keep_optimizer(model, t):
        captured["optimizer"] = real_make_optimizer(model, t)
        return captured["optimizer"]

    monkeypatch.setattr(finetune.train.setup, "make_optimizer", keep_optimizer)
    path = llama_recipe(tmp_path, llama_1b_dir, long_text, "qlora_1b", lora={"r": 64, "alpha": 128})
    baseline = free_gpu_memory()
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "qlora_1b"
    summary = json.loads((run / "summary.json").read_text())
    rows = [r for r in metrics(run) if "loss" in r]

    opt = captured.pop("optimizer")
    kind, is_paged, n_params = type(opt).__name__, opt.is_paged, sum(len(g["params"]) for g in opt.param_groups)
    placed = optimizer_state_placement(opt)
    del opt
    paged_bytes = placed["paged_bytes"]

    planned = plan(load_recipe(path), device="cuda")
    allocated = summary["peak_memory_gib"] * 2**30 - baseline
    measured = allocated + paged_bytes
    ratio = measured / planned.total
    loss = [r["loss"] for r in rows]
    report("qlora_1b", tokens_per_s=round(statistics.median(r["tokens_per_s"] for r in rows[1:])),
           loss=[round(x, 3) for x in loss], peak_allocated_gib=round(allocated / 2**30, 3),
           baseline_gib=round(baseline / 2**30, 3), paged_optimizer_gib=round(paged_bytes / 2**30, 3),
           peak_device_gib=round(measured / 2**30, 3), planned_gib=round(planned.total / 2**30, 3),
           measured_over_planned=round(ratio, 3), optimizer=kind, paged_tensors=placed["paged"],
           device_tensors=placed["on_device"], misplaced=placed["misplaced"][:5], wall_s=summary["wall_time_s"],
           plan_terms={t.name: round(t.bytes / 2**30, 3) for t in planned.terms if t.counted})
    free_gpu_memory()
    assert all(math.isfinite(x) for x in loss) and len(loss) == 20
    assert sum(loss[-3:]) / 3 < 0.8 * loss[0], loss
    assert kind == "PagedAdamW32bit" and is_paged and placed["params"] == n_params
    assert not placed["misplaced"] and placed["paged"] > 0  # all on this GPU; the large ones paged (managed memory)
    assert 0.8 <= ratio <= 1.2, (measured, planned.total)


# Dense bf16 peak of the spec sheets (FLOP/s, without sparsity), by the words of torch.cuda.get_device_name():
# the first entry whose words all appear wins.
SPEC_BF16_FLOPS = [
    ({"H100", "PCIe"}, 756e12), ({"H100", "NVL"}, 835e12), ({"H100"}, 989e12),  # H100 SXM: "NVIDIA H100 80GB HBM3"
    ({"H200", "NVL"}, 835e12), ({"H200"}, 989e12), ({"A100"}, 312e12), ({"L40S"}, 362e12),
    ({"A10G"}, 125e12), ({"A10"}, 125e12), ({"L4"}, 121e12), ({"RTX", "4090"}, 165e12),
]


def spec_bf16_flops(name: str) -> float | None:
    words = set(re.split(r"[\s_-]+", name))
    return next((flops for needed, flops in SPEC_BF16_FLOPS if needed <= words), None)


def measured_bf16_flops(n: int = 8192, warmup: int = 5, iters: int = 30) -> float:
    """FLOP/s of an n x n x n bf16 matmul on this GPU, timed with CUDA events after a few warm runs."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        torch.matmul(a, b, out=out)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del a, b, out
    return 2 * n**3 * iters / seconds


def test_1b_throughput_and_mfu_of_qlora_and_lora_at_512_and_4096_tokens(tmp_path, llama_1b_dir, long_text):
    """Tokens/s of the steady steps (all but the first) of QLoRA (4-bit base) and plain LoRA (bf16 base), packed
    full rows of 512 (micro batch 4) and 4096 tokens (micro batch 1), 2 micro batches a step, gradient
    checkpointing on. MFU = flops_per_token(config, row length, LoRA parameters) x tokens/s / peak."""
    from transformers import AutoConfig

    from finetune.plan.flops import flops_per_token

    config = AutoConfig.from_pretrained(llama_1b_dir)
    free_gpu_memory()
    peak = measured_bf16_flops()
    spec = spec_bf16_flops(torch.cuda.get_device_name())
    found = {}
    for seq, micro, steps in ((512, 4, 8), (4096, 1, 6)):
        for kind, four_bit in (("qlora", True), ("lora", False)):
            name = f"{kind}_{seq}"
            path = llama_recipe(tmp_path, llama_1b_dir, long_text, name, quantization={"load_in_4bit": four_bit},
                                data={"max_length": seq}, max_steps=steps, micro_batch_size=micro,
                                gradient_accumulation_steps=2)
            free_gpu_memory()
            result = runner.invoke(app, ["train", str(path)])
            assert result.exit_code == 0, result.output
            run = tmp_path / "runs" / name
            rows = [r for r in metrics(run) if "loss" in r]
            adapter = load_file(run / "checkpoint-final" / "adapter_model.safetensors")
            lora_params = sum(t.numel() for t in adapter.values())
            tokens_per_s = steady_tokens_per_s(rows)
            flops = flops_per_token(config, seq, lora_params)
            model_flops = flops * tokens_per_s
            found[name] = {
                "tokens_per_s": round(tokens_per_s),
                "step_s": round(statistics.median(r["step_s"] for r in rows[1:]), 4),
                "mfu": round(model_flops / peak, 4), "mfu_spec": spec and round(model_flops / spec, 4),
                "flops_per_token": flops, "lora_params": lora_params, "peak_gib": rows[-1]["memory_gib"],
                "full_rows": all(step_tokens(r) == pytest.approx(2 * micro * seq, rel=1e-6) for r in rows),
                "steps": len(rows), "loss_finite": all(math.isfinite(r["loss"]) for r in rows),
            }
    ratio = {seq: round(found[f"qlora_{seq}"]["tokens_per_s"] / found[f"lora_{seq}"]["tokens_per_s"], 3)
             for seq in (512, 4096)}
    report("throughput", peak_measured_tflops=round(peak / 1e12, 1), peak_spec_tflops=spec and spec / 1e12,
           qlora_over_lora_512=ratio[512], qlora_over_lora_4096=ratio[4096], **found)
    free_gpu_memory()
    assert all(r["steps"] == (8 if name.endswith("_512") else 6) and r["loss_finite"] and r["full_rows"]
               for name, r in found.items()), found
    assert all(0 < r["mfu"] < 1 for r in found.values()), found
    assert spec is None or 0.3 < peak / spec < 1.1, (peak, spec)  # the matmul measured what it should
    assert all(0.1 < x < 1.5 for x in ratio.values()), ratio


# ------------------------------------------------------------------------------------------- two GPUs


def two_gpu_recipe(tmp, model_dir, name, **training):
    """test_distributed's job on the GPU defaults (4-bit base, auto bf16, paged AdamW), without dropout (its draws
    differ between one and two processes): 64 rows, 6 steps, eval and a checkpoint at step 3."""
    from test_distributed import recipe

    return recipe(tmp, model_dir, name, dropout=0.0, compute_dtype="auto", **training)


@pytest.fixture(scope="module")
def one_gpu_run(tmp_path_factory, tiny_model_dir, toy_alpaca_rows):
    """The reference: one process with the two-process runs' effective batch (4 x 4 x 1 = 4 x 2 x 2)."""
    tmp = tmp_path_factory.mktemp("two_gpus")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows)
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[:8])
    path = two_gpu_recipe(tmp, tiny_model_dir, "one", gradient_accumulation_steps=4)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return tmp


def plain_peft_loads(checkpoint: Path, base_dir: Path) -> int:
    """Load a checkpoint with PeftModel.from_pretrained over the base (CPU, float32) and check it holds exactly the
    saved adapter, trained (some lora_B non-zero). Returns the number of adapter tensors."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    saved = load_file(checkpoint / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), checkpoint)
    loaded = get_peft_model_state_dict(model)
    assert saved and saved.keys() == loaded.keys(), sorted(set(saved) ^ set(loaded))[:6]
    assert all(torch.equal(loaded[k].to(saved[k].dtype), saved[k]) for k in saved)
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 2]])).logits).all()
    return len(saved)


def compare_with_one_process(name: str, tmp: Path, base_dir: Path, wall: float, step1_rel: float,
                             all_rel: float | None) -> None:
    one, two = losses(tmp / "runs" / "one"), losses(tmp / "runs" / name)
    rel = {s: abs(two[s] - one[s]) / abs(one[s]) for s in one if s in two}
    run = tmp / "runs" / name
    checkpoints = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint"))
    try:
        tensors = plain_peft_loads(run / "checkpoint-final", base_dir)
    except Exception as e:  # reported, then failed below
        tensors = f"plain PEFT failed: {type(e).__name__}: {e}"[:800]
    report(name, losses_one_process=list(one.values()), losses_two_gpus=list(two.values()),
           max_rel_diff=max(rel.values(), default=None), step1_rel_diff=rel.get(1), wall_s=wall,
           adapter_tensors=tensors, checkpoints=checkpoints)
    assert sorted(two) == list(range(1, 7)) == sorted(one)  # every step logged once: one writer
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x] == list(range(1, 7))
    assert checkpoints == ["checkpoint-3", "checkpoint-final"]
    assert all(math.isfinite(v) for v in two.values()) and two[6] < two[1]
    assert rel[1] < step1_rel, rel  # the same examples, the same (4-bit) model: the same first loss
    assert all_rel is None or max(rel.values()) < all_rel, rel
    assert isinstance(tensors, int), tensors


@two_gpus
def test_ddp_on_two_gpus_matches_one_process_and_saves_a_plain_peft_adapter(one_gpu_run, tiny_model_dir):
    tmp = one_gpu_run
    path = two_gpu_recipe(tmp, tiny_model_dir, "ddp")
    _, wall = run_process("ddp", [sys.executable, "-m", "finetune", "train", str(path), "--nproc", "2"], tmp)
    # summation order differs (2 micro batches per process, then an all-reduce); bf16 compute keeps it small
    compare_with_one_process("ddp", tmp, tiny_model_dir, wall, step1_rel=1e-4, all_rel=1e-2)


@two_gpus
def test_fsdp_qlora_on_two_gpus_trains_and_saves_a_plain_peft_adapter(one_gpu_run, tiny_model_dir):
    """The 4-bit base sharded (FSDP2): codes stored in bf16 (quant_storage auto), one unit per decoder layer, the
    adapter gathered on save; AdamW from torch (bitsandbytes' has no DTensor rule). FSDP computes the logits
    itself (no labelled-rows head) and casts the adapter to bf16 for compute: a looser first loss."""
    tmp = one_gpu_run
    path = two_gpu_recipe(tmp, tiny_model_dir, "fsdp", optimizer="adamw_torch")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "fsdp_qlora.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "finetune", "train", str(path)]
    _, wall = run_process("fsdp", cmd, tmp)
    compare_with_one_process("fsdp", tmp, tiny_model_dir, wall, step1_rel=2e-2, all_rel=None)
