"""Every script in scripts/ run as a user runs it: `python scripts/NAME.py ...` in a fresh process with this venv's
python, from the repository root, in its smallest real form on the 2-layer test model. So an import or a flag that
breaks is caught the day it breaks, exactly as a user would meet it. Each test asserts the exit code and a fact of
what the script printed or wrote (a table row, a JSON field, a file); never a timing.

One test function per script, named test_<script>; test_every_script_is_run_here holds the list to the directory
(scripts/fetch_model.py is run by `make demo`, scripts/qalora_export.py by tests/test_qalora.py). The TRL comparisons run both tools where TRL is installed (the
`bench` extra, not in CI) and finetune's side alone (`--tools finetune`) where it is not.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recipe_file, task_data, write_jsonl
from typer.testing import CliRunner

from finetune.cli import app as cli_app
from finetune.model import allocator

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "data" / "quickstart"
HAS_TRL = importlib.util.find_spec("trl") is not None
TOOLS = "finetune,trl" if HAS_TRL else "finetune"
COVERED_ELSEWHERE = {"fetch_model": "make demo", "qalora_export": "tests/test_qalora.py (on a tiny Q4_1 file)"}


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """`python scripts/NAME ARGS` from the repository root; fails the test with its output unless it exits 0."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"scripts/{name} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n"
                                  f"--- stderr\n{done.stderr[-6000:]}")
    return done


def test_every_script_is_run_here():
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    missing = sorted(s for s in scripts - set(COVERED_ELSEWHERE) if f"test_{s}" not in globals())
    assert not missing, f"scripts without a test here: {missing} (add a test_<name> that runs each)"


@pytest.mark.parametrize("objective", ["sft", pytest.param("dpo", marks=pytest.mark.slow)])  # dpo: make test-slow (CI time)
def test_bench(objective, tiny_model_dir, tmp_path):
    variant = {"sft": "unpacked", "dpo": "online"}[objective]
    data = ["--data", QUICKSTART / "train.jsonl"] if objective == "sft" else []
    done = run_script("bench.py", "--objective", objective, "--model", tiny_model_dir, *data, "--examples", 2,
                      "--max-length", 256, "--micro-batch", 2, "--accumulation", 1, "--repeats", 1,
                      "--variants", variant, "--tools", TOOLS, "--gemm-tokens", 1, "--work", tmp_path)
    assert "step-1 loss" in done.stdout  # the table's row
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["spec"]["examples"] == 2 and results["spec"]["label_tokens"] > 0
    ours = results["summary"][f"finetune/{variant}"]
    assert ours["steps"] == 1  # 2 examples (pairs), micro batch 2, no accumulation: one optimizer step
    if objective == "dpo":  # LoRA B = 0: policy = reference, so the first loss is log 2
        assert ours["step1_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert math.isfinite(ours["step1_loss"]) and ours["step1_loss"] > 0
    if HAS_TRL:  # the same job in both tools (float32 compute): the same first loss
        assert ours["step1_loss"] == pytest.approx(results["summary"][f"trl/{variant}"]["step1_loss"], rel=2e-3)


def test_bench_step(tiny_model_dir, tmp_path):
    out = tmp_path / "step.json"
    run_script("bench_step.py", "profile", "--model", tiny_model_dir, "--paths", "fp32", "--repeats", 1,
               "--gemm-tokens", 1, "--json", out)  # one path: every path builds through the same finetune calls
    result = json.loads(out.read_text())
    assert set(result["peak_gflops"]) == {"fp32", "bf16"}
    assert result["fp32"]["model_gflops"] > 0
    assert "matmul" in result["fp32"]["time_share"]
    assert sum(result["fp32"]["time_share"].values()) == pytest.approx(1, abs=0.01)
    assert {"LM head + loss", "optimizer (a quarter of a step)"} <= set(result["fp32"]["time_share"])
    # ab: peft's LoRA forward (A) against the fused one (B), interleaved; in float32 the same masks, the same loss
    run_script("bench_step.py", "ab", "--model", tiny_model_dir, "--paths", "fp32", "--a", "lora=peft",
               "--repeats", 2, "--layers", 1, "--json", out)
    ab = json.loads(out.read_text())
    assert len(ab["runs"]["A"]) == len(ab["runs"]["B"]) == 2 and ab["speedup_B_over_A"] > 0
    assert ab["losses"]["A"] == pytest.approx(ab["losses"]["B"], rel=1e-5)
    # attention: the padding-free row's forms, and flash against the matrix products per example length and dtype
    run_script("bench_step.py", "attention", "--lengths", 16, "--repeats", 1, "--json", out)
    forms = json.loads(out.read_text())
    assert forms["math_max_abs_diff"] < 1e-4  # the products are the masked attention (float32)
    assert set(forms["by_length"]) == {"fp32 16", "bf16 16"}
    assert all(row["flash_ms"] > 0 and row["math_ms"] > 0 for row in forms["by_length"].values())


def test_bench_memory(tiny_model_dir, tmp_path):
    data = tmp_path / "gsm.jsonl"  # GSM8K's columns, as recipes/gsm8k.yaml reads them
    write_jsonl(data, [{"question": f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?",
                        "answer": f"He has {i} + {i + 3} = {2 * i + 3} apples.\n#### {2 * i + 3}"} for i in range(8)])
    done = run_script("bench_memory.py", "--model", tiny_model_dir, "--data", data, "--lengths", 64,
                      "--checkpointing", "false", "--policies", "trim", "--steps", 1, "--dtype", "float32",
                      "--work", tmp_path / "work")
    assert "   64 ckpt=False trim" in done.stdout
    [row] = json.loads((tmp_path / "work" / "results.json").read_text())
    assert (row["length"], row["checkpointing"], row["policy"]) == (64, False, "trim")
    assert row["peak_gib"] > 0 and row["plan_gib"] > 0


def test_bench_serve(tiny_model_dir, tmp_path):
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n")
    run_script("bench_serve.py", "--model", tiny_model_dir, "--clients", 1, "--requests", 1, "--max-tokens", 2,
               "--out", out)
    text = out.read_text()
    assert text.startswith("# Performance\n")
    block = text.split("<!-- bench_serve:start -->")[1].split("<!-- bench_serve:end -->")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()
            if line.startswith("| ") and not line.startswith("| adapters")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "one at a time (`generate`)", "1"), ("1", "1", "1"),
                                                  ("4 mixed", "one at a time (`generate`)", "1"), ("4 mixed", "1", "1")]
    assert all(float(r[4]) > 0 for r in rows)  # tokens were generated in every configuration



def test_bench_generate(tiny_model_dir, tmp_path):
    out = tmp_path / "performance.md"
    out.write_text("# Performance\n")
    done = run_script("bench_generate.py", "--model", tiny_model_dir, "--batches", 1, 2, "--max-new-tokens", 3,
                      "--repeats", 1, "--streams", 4, "--no-llamacpp", "--work", tmp_path / "work", "--out", out)
    text = out.read_text()
    assert text.startswith("# Performance\n") and "<!-- bench_generate:start -->" in text
    for row in ("| finetune |", "| transformers generate |", "| serve engine, 1 adapter |",
                "| serve engine, 4 mixed adapters |", "four mixed adapters / one adapter",
                "finetune / transformers generate at batch 2"):
        assert row in text, row
    # FINETUNE_DECODE_WEIGHTS=int8's row where the decode step takes int8 on this CPU, else the bench says why not
    assert ("| finetune, int8 weights |" in text) != ("int8 weights: not measured" in done.stdout)
    # every tool under the allocator the decoding verbs re-execute under (the script re-executed itself)
    tcmalloc = allocator.find_tcmalloc() is not None and allocator.cpu_only()
    assert f"allocator {'tcmalloc' if tcmalloc else 'glibc'} (every tool)" in text


def test_bench_decode_weights(tiny_model_dir, tmp_path):
    texts = tmp_path / "texts.jsonl"
    write_jsonl(texts, [{"text": "A cat and a dog sat under the tree in the rain."},
                        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\n#### 5"}])
    done = run_script("bench_decode_weights.py", "--model", tiny_model_dir, "--rows", 1, 2, "--repeats", 1,
                      "--llamacpp-tps", 100, "--accuracy", texts, "--texts", 2, "--max-tokens", 8)
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"format", "float32", "float32 packed", "float16", "bfloat16", "bfloat16 packed",
                         "int8, float32 in and out"}
    assert rows["int8, float32 in and out"].count(" / ") == 2
    assert "x llama.cpp)" in rows["float32"] and rows["float32"].count(" / ") == 2  # a cell per row count
    [choice] = [line for line in done.stdout.splitlines() if "plain_rows" in line]
    assert "float32: " in choice and "bfloat16: " in choice and "packed" in choice
    [int8] = [line for line in done.stdout.splitlines() if "FINETUNE_DECODE_WEIGHTS=int8" in line]
    assert int8.count("int8 at up to") + int8.count("the exact weights at every") == 4  # two dtypes, two bars
    assert int8.count("with one adapter folded in: ") == 2
    # int8 vs exact, token by token: 16 tokens (8 of each text), agreeing on most, a small KL that is not 0
    [line] = [x for x in done.stdout.splitlines() if x.startswith("int8 decode weights vs exact")]
    agree, kl = float(line.split("agreement ")[1].split("%")[0]), float(line.split("mean KL ")[1].split()[0])
    assert "16 tokens of 2 texts" in line and agree >= 75 and 0 < kl < 0.05, line


@pytest.mark.parametrize("objective", ["kto", "reward"])
def test_pref_vs_trl(objective, tiny_model_dir, tmp_path):
    run_script("pref_vs_trl.py", "--objective", objective, "--model", tiny_model_dir, "--examples", 2, "--steps", 1,
               "--out", tmp_path, "--tools", TOOLS)
    report = json.loads((tmp_path / f"{objective}_report.json").read_text())
    [step] = report["steps"]
    # policy = reference (LoRA B = 0): KTO's loss is 1 - sigmoid(0); the zero score head: Bradley-Terry's log 2
    first = {"kto": 0.5, "reward": math.log(2)}[objective]
    assert step["loss"]["finetune"] == pytest.approx(first, abs=1e-6)
    if HAS_TRL:
        assert step["loss"]["trl"] == pytest.approx(first, abs=1e-6)
        assert step["grad_norm"]["finetune"] == pytest.approx(step["grad_norm"]["trl"], rel=1e-4)


def test_grpo_vs_trl(tiny_model_dir, tmp_path):
    run_script("grpo_vs_trl.py", "--steps", 1, "--out", tmp_path, "--tools", TOOLS,
               f"model.name_or_path={tiny_model_dir}", "quantization.compute_dtype=float32",
               "training.micro_batch_size=1", "grpo.group_size=4", "grpo.generation_batch_size=4",
               "grpo.max_new_tokens=6", "rewards=[{function: length, limit: 6, weight: 1.0}]")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["speed"]["examples"] == 4  # 1 step x 1 prompt x 4 answers
    [row] = [json.loads(x) for x in (tmp_path / "finetune_speed" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert row["step"] == 1 and "reward/length" in row and row["completion_length_max"] <= 6
    assert (tmp_path / "finetune_speed" / "checkpoint-final" / "adapter_config.json").is_file()
    if HAS_TRL:  # the same sampled completions through both losses: equal loss and gradient
        eq = report["equality"]
        assert eq["trl_grad_norm"] > 0
        assert eq["finetune_loss"] == pytest.approx(eq["trl_loss"], abs=1e-5)
        assert eq["finetune_grad_norm"] == pytest.approx(eq["trl_grad_norm"], rel=1e-4)


def test_board_screenshot(tiny_model_dir, toy_alpaca_rows, tmp_path):
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows[:8])
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({
        "name": "tiny", "output_dir": str(tmp_path / "runs" / "tiny"), "model": {"name_or_path": str(tiny_model_dir)},
        "quantization": {"load_in_4bit": False}, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(tmp_path / "train.jsonl"), "format": "alpaca", "max_length": 32},
        "training": {"max_steps": 2, "micro_batch_size": 4, "logging_steps": 1, "optimizer": "adamw_torch",
                     "gradient_checkpointing": False}}))
    result = CliRunner().invoke(cli_app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "board.png"
    done = run_script("board_screenshot.py", tmp_path / "runs", out, "--size", "800,600")
    assert f"wrote {out}" in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_quickstart_data(tmp_path):
    """The committed quickstart data is what the script generates with its defaults, byte for byte."""
    done = run_script("make_quickstart_data.py", "--out-dir", tmp_path)
    assert "1000 train and 100 eval records" in done.stdout
    committed = sorted(p.name for p in QUICKSTART.glob("*.jsonl"))
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == committed
    for name in committed:
        assert (tmp_path / name).read_bytes() == (QUICKSTART / name).read_bytes(), name


def test_recipe_reference(tmp_path):
    """On a copy of the page holding the table, with the table gone stale: the script writes it back as committed
    (tests/test_recipe.py checks that the committed table matches the schema)."""
    begin, end = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"
    page = next(p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if begin in p.read_text())
    text = page.read_text()
    stale = tmp_path / page.name
    stale.write_text(text.split(begin)[0] + begin + "\n| `gone` | int | | stale |\n" + end + text.split(end, 1)[1])
    done = run_script("recipe_reference.py", "--file", stale)
    assert f"updated the recipe reference in {stale}" in done.stdout
    assert stale.read_text() == text


def test_models_table(tmp_path):
    """On a copy of docs/models.md with the table gone stale: --check says so (exit 1), the script writes the
    committed table back (tests/test_families.py checks that the committed table is the generated one)."""
    begin, end = "<!-- families-table:begin -->", "<!-- families-table:end -->"
    text = (ROOT / "docs" / "models.md").read_text()
    stale = tmp_path / "models.md"
    stale.write_text(text.split(begin)[0] + begin + "\n| Falcon | yes |\n" + end + text.split(end, 1)[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "models_table.py"), "--check", "--file", str(stale)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 1 and "stale" in check.stdout, check.stderr[-3000:]
    done = run_script("models_table.py", "--file", stale)
    assert f"wrote the family table in {stale}" in done.stdout
    assert stale.read_text() == text


def test_qmethods_report(tiny_model_dir, tmp_path, monkeypatch):
    """Both formats' quantization errors and every step-0 loss, as JSON; ICQ-NF4's codes carry more entropy than
    NF4's (the point of its calibration)."""
    monkeypatch.setenv("FINETUNE_ICQ_CACHE", str(tmp_path / "icq"))
    recipe = recipe_file(tmp_path, tiny_model_dir, task_data(tmp_path / "data"), quantization={"load_in_4bit": True})
    out = tmp_path / "report.json"
    done = run_script("qmethods_report.py", recipe, "--loftq-iters", 2, "--limit", 2, "--json", out)
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report
    errors, losses = report["quantization_error"], report["step0_eval_loss"]
    assert set(errors) == {"nf4", "icq_nf4"}
    assert errors["icq_nf4"]["code_entropy_bits"] > errors["nf4"]["code_entropy_bits"]
    assert set(losses) == {"full_precision", "qlora_nf4", "qlora_icq_nf4", "loftq_nf4_T2"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())  # LoftQ's closer start: tests/test_loftq.py
