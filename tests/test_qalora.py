"""QA-LoRA (lora.use_qalora): the adapter's input pooled over groups on every kind of base (float, NF4, a GGUF file's
blocks), refused where a group does not divide a layer, resumed exactly, merged; and its exact export: the update
folded into a Q4_1 file's block offsets, scales and codes byte-identical (scripts/qalora_export.py, run here in its
smallest form, against plain LoRA re-quantized), and an export that cannot fold saying why."""

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.export.gguf import write_gguf
from finetune.recipe.schema import Recipe

from conftest import training_model, write_jsonl
from test_quantized_base import data, gguf_cache, recipe, tiny_q4_1  # noqa: F401 (shared fixtures)
from test_training import assert_same_adapter, losses, one_thread, stop_after_save  # noqa: F401

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def qalora_recipe(model, quant: dict, group=32) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(model)}, "quantization": {"compute_dtype": "float32", **quant},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "use_qalora": True, "qalora_group_size": group},
        "data": {"train": ["unused.jsonl"]}})


@pytest.mark.parametrize("base", ["float", "nf4", "gguf"])
def test_the_adapter_reads_the_input_pooled_over_groups_on_every_base(base, tiny_model_dir, tiny_q4_1):
    quant = {"float": {"load_in_4bit": False}, "nf4": {}, "gguf": {"quant_type": "gguf"}}[base]
    model = training_model(qalora_recipe(tiny_q4_1 if base == "gguf" else tiny_model_dir, quant)).eval()
    layer = model.base_model.model.model.layers[0].mlp.down_proj  # 128 inputs: 4 groups of 32
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 4) and b.shape == (64, 4) and a.dtype == torch.float32
    with torch.no_grad():
        b.normal_()
        x = torch.randn(2, 3, 128)
        update = layer(x) - layer.get_base_layer()(x)
        pooled = x.reshape(2, 3, 4, 32).mean(-1) * 4  # PEFT's pooling: the group mean times in / N
        assert torch.allclose(update, pooled @ a.T @ b.T * layer.scaling["default"], atol=1e-5, rtol=1e-4)
        delta = layer.get_delta_weight("default")  # the same update as a weight, constant over each group
        assert torch.equal(delta, delta[:, ::32].repeat_interleave(32, dim=1))
        assert torch.allclose(update, x @ delta.T, atol=1e-5, rtol=1e-4)


def write_recipe(tmp_path, body_updates: dict, tiny_model_dir) -> Path:
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"instruction": "hi", "input": "", "output": "hi"}])
    body = {"model": {"name_or_path": str(tiny_model_dir)}, "quantization": {"load_in_4bit": False},
            "data": {"train": str(data)}, **body_updates}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(body))
    return path


def test_a_group_that_does_not_divide_a_layer_is_refused_naming_the_layer(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, {"lora": {"use_qalora": True, "qalora_group_size": 48}}, tiny_model_dir)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "lora.qalora_group_size 48 does not divide the input size 64 of model.layers.0.self_attn.q_proj" in text


def test_qalora_with_dora_is_refused_at_validate_time(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, {"lora": {"use_qalora": True, "use_dora": True}}, tiny_model_dir)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "lora.use_qalora cannot be combined with lora.use_dora" in result.output


# ---------------------------------------------------------------------------------- the exact export


@pytest.fixture(scope="module")
def folded(tmp_path_factory, tiny_q4_1, data):  # noqa: F811
    """QA-LoRA trained on the Q4_1 file's blocks, exported with --type q4_1."""
    tmp = tmp_path_factory.mktemp("folded")
    path = recipe(tmp, tiny_q4_1, data, "qalora", lora={"use_qalora": True, "target_modules": "all-linear"},
                  max_steps=4, learning_rate=2e-2)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    ckpt, out = tmp / "runs" / "qalora" / "checkpoint-final", tmp / "out" / "qalora-q4_1.gguf"
    out.parent.mkdir()
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(out), "--type", "q4_1"])
    assert result.exit_code == 0, result.output
    return ckpt, out, json.loads((out.parent / "export_report.json").read_text()), " ".join(result.output.split())


def test_the_folded_file_keeps_every_scale_and_code_byte(folded, tiny_q4_1):  # noqa: F811
    folded = folded[1]
    assert folded.stat().st_size == tiny_q4_1.stat().st_size
    src, dst = gguf.GGUFReader(str(tiny_q4_1)), gguf.GGUFReader(str(folded))
    assert [(t.name, t.tensor_type, list(t.shape)) for t in src.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in dst.tensors]
    moved = 0
    for a, b in zip(src.tensors, dst.tensors):
        x, y = np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)
        if a.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            assert np.array_equal(x, y), a.name  # embedding, head, norms: untouched
            continue
        x, y = x.reshape(-1, 20), y.reshape(-1, 20)  # Q4_1 block: d (2 bytes), m (2), 16 bytes of codes
        assert np.array_equal(x[:, :2], y[:, :2]) and np.array_equal(x[:, 4:], y[:, 4:]), a.name
        moved += int((x[:, 2:4] != y[:, 2:4]).any(axis=1).sum())
    assert moved > 0.9 * sum(t.n_elements // 32 for t in src.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1)


def test_each_offset_is_the_source_offset_plus_the_update_rounded_to_fp16(folded, tiny_q4_1):  # noqa: F811
    """Recomputed here from the adapter file alone: U = s (in / N) / N (B A) per block, rows into the file's
    rope-permuted order for q and k."""
    from finetune.export import rope_permute

    ckpt, out, _, _ = folded
    weights = load_file(ckpt / "adapter_model.safetensors")
    src = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tiny_q4_1)).tensors}
    dst = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    for module, name, heads in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                ("mlp.down_proj", "ffn_down", None)]:
        prefix = f"base_model.model.model.layers.1.{module}"
        a, b = weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]
        update = (b @ a) * (2.0 * a.shape[1] / 32)  # scaling alpha / r = 8 / 4; groups of 32 = one block each
        if heads:
            update = rope_permute(update, heads)
        m = lambda data: torch.from_numpy(data.reshape(-1, 20)[:, 2:4].copy()).view(torch.float16).float()  # noqa
        expected = (m(src[f"blk.1.{name}.weight"]) + update.reshape(-1, 1)).to(torch.float16).float()
        assert torch.equal(m(dst[f"blk.1.{name}.weight"]), expected), name


def test_the_export_report_proves_the_fold(folded):
    _, _, report, printed = folded
    fold = report["fold"]
    assert report["type"] == "q4_1" and report["merged_from"] is None and fold["folded_tensors"] == 14
    assert fold["scales_and_codes_identical"] and fold["other_tensors_identical"] and fold["same_size"] \
        and fold["same_types"] and fold["offsets_changed"] > 0
    assert 0 < fold["offset_rounding_max"] <= 2 ** -11  # the offsets |m + U| are < 1 here: half an fp16 ulp
    f = report["fidelity"]  # the file read back by transformers, against base blocks + adapter
    # the logits within 0.05 of the trained model's; the top-1 token may flip where a tiny random model's top two
    # logits lie closer than that (1 of 69 probe tokens for the adapter of deb11b7's dropout draws)
    assert f["top1_agreement"] >= 0.95 and f["max_abs_logit_diff"] < 0.05
    assert all(report["tokenizer_agreement"].values())
    parts = report["fidelity_parts"]  # without the fp16 rounding the fold is the trained model up to float arithmetic
    assert parts["unrounded_fold_vs_trained"]["max_abs_logit_diff"] < 1e-4
    assert parts["file_vs_unrounded_fold"]["max_abs_logit_diff"] > 10 * parts["unrounded_fold_vs_trained"]["max_abs_logit_diff"]
    assert "QA-LoRA folded exactly into 14 q4_1 tensors" in printed and "byte-identical: True" in printed


@pytest.mark.slow  # two trainings, two exports and six model loads in subprocesses: ~1 min on 2 idle cores
def test_the_script_compares_the_fold_with_requantized_lora(tmp_path, tiny_q4_1, data):  # noqa: F811
    """scripts/qalora_export.py in its smallest form: QA-LoRA folded vs plain LoRA merged and re-quantized."""
    cmd = [sys.executable, str(ROOT / "scripts" / "qalora_export.py"), "--gguf", str(tiny_q4_1),
           "--train", str(data / "train.jsonl"), "--eval", str(data / "eval.jsonl"), "--out", str(tmp_path),
           "--steps", "3", "--rank", "4", "--batch", "4", "--lr", "2e-2", "--max-length", "32",
           "--eval-examples", "2", "--no-llama"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "qalora_export.json").read_text())
    qa, lora = result["runs"]["qalora"], result["runs"]["lora"]
    assert qa["export"] == "folded" and lora["export"] == "merged + re-quantized"
    assert qa["fold"]["scales_and_codes_identical"] and qa["fold"]["same_size"]
    assert qa["max_abs_logit_diff"] < lora["max_abs_logit_diff"] / 2
    assert qa["mean_abs_logit_diff"] < lora["mean_abs_logit_diff"] / 2
    assert qa["top1_agreement"] >= lora["top1_agreement"]
    base = result["base"]["gguf blocks (quant_type gguf)"]
    assert base["max_abs_logit_diff"] == 0 and base["top1_agreement"] == 1.0  # no second rounding
    assert result["base"]["nf4 of the dequantized file (quant_type nf4)"]["max_abs_logit_diff"] > 0
    assert "QA-LoRA (folded) vs trained" in done.stdout


def test_a_zero_update_folds_into_a_byte_identical_file(tmp_path, tiny_q4_1):  # noqa: F811
    from finetune.export.fold import write_folded

    zeros = {t.name: torch.zeros(int(t.shape[1]), int(t.shape[0]) // 32) for t in gguf.GGUFReader(str(tiny_q4_1)).tensors
             if t.tensor_type == gguf.GGMLQuantizationType.Q4_1}
    out = tmp_path / "same.gguf"
    rounding, notes = write_folded(tiny_q4_1, out, zeros, None)
    assert filecmp.cmp(out, tiny_q4_1, shallow=False) and rounding["offset_rounding_max"] == 0 and notes == []


# ----------------------------------------------------------------- where folding cannot be exact


@pytest.fixture(scope="module")
def tiny_q4_0(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("q4_0") / "tiny-q4_0.gguf"
    write_gguf(tiny_model_dir, path, "q4_0")
    return path


def test_export_says_why_it_cannot_fold_and_requantizes(tmp_path, tiny_q4_0, data):  # noqa: F811
    path = recipe(tmp_path, tiny_q4_0, data, "q40", lora={"use_qalora": True}, max_steps=1)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    ckpt = tmp_path / "runs" / "q40" / "checkpoint-final"
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "x.gguf"), "--type", "q4_1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["fold"] is None and report["merged_from"] == str(ckpt) and report["fidelity"]  # re-quantized, proved
    assert any(n.startswith("not folded") and "stores its layers as q4_0, not q4_1" in n and "re-quantized to q4_1" in n
               for n in report["notes"])
    from finetune.export.fold import exact_fold

    assert exact_fold(ckpt, "q4_0")[0] is False and "q4_0 has no per-block offset" in exact_fold(ckpt, "q4_0")[1]
    assert exact_fold(ckpt, "q8_0")[0] is False and exact_fold(tmp_path, "q4_1") == (False, None)  # not QA-LoRA


def test_qalora_resume_is_bit_exact_on_a_gguf_base(tmp_path, tiny_q4_1, data, monkeypatch):  # noqa: F811
    kwargs = {"lora": {"use_qalora": True}, "max_steps": 3}
    straight = recipe(tmp_path / "a", tiny_q4_1, data, "run", **kwargs)
    resumed = recipe(tmp_path / "b", tiny_q4_1, data, "run", save_steps=2, **kwargs)
    assert runner.invoke(app, ["train", str(straight)]).exit_code == 0
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert runner.invoke(app, ["train", str(resumed)]).exit_code == 130
    result = runner.invoke(app, ["train", str(resumed), "--resume"])
    assert result.exit_code == 0, result.output
    a, b = tmp_path / "a" / "runs" / "run", tmp_path / "b" / "runs" / "run"
    assert losses(b) == losses(a) and len(losses(a)) == 3
    assert_same_adapter(b / "checkpoint-final", a / "checkpoint-final", atol=0)


def test_a_qalora_adapter_on_nf4_merges_into_the_model_it_trained(tmp_path, tiny_model_dir, data):  # noqa: F811
    path = recipe(tmp_path, tiny_model_dir, data, "nf4", quantization={"quant_type": "nf4"},
                  lora={"use_qalora": True}, max_steps=2)
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    from finetune.merge.model import merge

    report = merge(tmp_path / "runs" / "nf4" / "checkpoint-final", tmp_path / "merged", dtype="fp32")
    chosen = report.fidelity["dequantized"]
    assert chosen["max_abs_logit_diff"] < 1e-3 and chosen["top1_agreement"] == 1.0


REAL_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_on_the_real_model_the_folded_file_replies_in_llama_cpp_as_finetune_chat_does(tmp_path):
    """The acceptance run: SmolLM2-135M's Q4_1 file, the quickstart data, 20 steps; QA-LoRA (groups of 32) folded
    into a Q4_1 file that llama.cpp runs (llama-cpp-python: the llamacpp extra), against plain LoRA re-quantized."""
    pytest.importorskip("llama_cpp")
    if not REAL_GGUF.is_file() or not (ROOT / "data" / "quickstart" / "train.jsonl").is_file():
        pytest.skip("needs models/SmolLM2-135M-Instruct.Q4_1.gguf (make fetch) and data/quickstart (make data)")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "qalora_export.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "qalora_export.json").read_text())
    qa, lora = result["runs"]["qalora"], result["runs"]["lora"]
    fold = qa["fold"]
    assert fold["folded_tensors"] == 210 and fold["scales_and_codes_identical"] and fold["same_size"] \
        and fold["same_types"] and fold["other_tensors_identical"]
    assert qa["max_abs_logit_diff"] < lora["max_abs_logit_diff"] and qa["top1_agreement"] > lora["top1_agreement"]
    assert qa["replies_equal"], (qa["chat_reply"], qa["llama_cpp_reply"])


def test_chat_and_serve_reply_alike_with_the_qalora_checkpoint_on_the_files_blocks(folded):
    pytest.importorskip("uvicorn")
    from finetune.generate.session import ChatOptions, load_session, reply
    from finetune.serve import load
    from test_serve import PROMPT, TOKENS, Server, chat

    ckpt = folded[0]
    session = load_session(str(ckpt))
    layer = session.model.base_model.model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "QALoraLinear" and layer.get_base_layer().cached_weight is not None
    expected = reply(session, PROMPT, ChatOptions(max_new_tokens=TOKENS))
    s = Server(load(str(ckpt)))
    try:
        assert chat(s.client(), "qalora").choices[0].message.content == expected
    finally:
        s.stop()
