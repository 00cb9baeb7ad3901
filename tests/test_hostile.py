"""Hostile model files: each is refused with one paragraph naming the file and exit 2, before anything large is
allocated or any code runs (safetensors' own header check, the gguf package's reader, PEFT config types).

Pickle payloads in training_state.pt and trust_remote_code are in tests/test_trust.py.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A plain PEFT LoRA adapter (q_proj, v_proj, r=4) of the tiny model, as another tool would save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("hostile") / "adapter"
    model.save_pretrained(path)
    return path


def copy(adapter: Path, tmp_path: Path) -> Path:
    out = tmp_path / "a"
    shutil.copytree(adapter, out)
    return out


def header(obj, pad: int = 16) -> bytes:
    h = json.dumps(obj).encode()
    return struct.pack("<Q", len(h)) + h + b"\0" * pad


SAFETENSORS = [  # (case, file bytes from the real file's bytes, message)
    ("truncated", lambda b: b[:100], "its header claims"),
    ("header length 2^62", lambda b: struct.pack("<Q", 2**62) + b"{}", "its header claims 4,611,686,018,427,387,904"),
    ("bit flip in the header", lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:], "invalid UTF-8 in header"),
    ("header is a JSON list", lambda b: header([1, 2]), "invalid type: sequence"),
    ("tensor entry is a number", lambda b: header({"x": 5}), "invalid type: integer"),
    ("offsets are a string", lambda b: header({"x": {"dtype": "F32", "shape": [4], "data_offsets": "a"}}),
     "expected a tuple of size 2"),
    ("shape of 2^80 elements", lambda b: header({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}),
     "overflow computing buffer size"),
    ("offsets past the end", lambda b: header({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}}),
     "invalid shape, data type, or offset"),
    ("a byte appended", lambda b: b + b"\0", "file not fully covered"),
]


@pytest.mark.parametrize("case,damage,message", SAFETENSORS, ids=[c[0] for c in SAFETENSORS])
def test_hostile_safetensors_is_named_by_verify_and_merge(adapter, tmp_path, tiny_model_dir, case, damage, message):
    a = copy(adapter, tmp_path)
    weights = a / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    for args in (["verify", str(a)], ["merge", str(a), "--out", str(tmp_path / "m"), "--base", str(tiny_model_dir)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert str(weights) in result.output and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


CONFIGS = [  # (case, change to adapter_config.json, message)
    ("a JSON list", lambda c: [1], "expected a JSON object of PEFT settings, got a JSON list"),
    ("r is text", lambda c: {**c, "r": "four"}, "r: Input should be a valid integer"),
    ("r is negative", lambda c: {**c, "r": -1}, "r must be a positive number (got '-1')"),
    ("target_modules is a number", lambda c: {**c, "target_modules": 5}, "target_modules: Input should be a valid"),
    ("an unknown key set", lambda c: {**c, "zzz_feature": True}, "zzz_feature set, which this PEFT does not know"),
    ("an unknown peft_type", lambda c: {**c, "peft_type": "NOPE"}, "peft_type 'NOPE' is not a PEFT adapter type"),
]


@pytest.mark.parametrize("case,change,message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_hostile_adapter_config_is_refused_before_loading(adapter, tmp_path, tiny_model_dir, case, change, message):
    a = copy(adapter, tmp_path)
    config = a / "adapter_config.json"
    config.write_text(json.dumps(change(json.loads(config.read_text()))))
    result = runner.invoke(app, ["merge", str(a), "--out", str(tmp_path / "m"), "--base", str(tiny_model_dir)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"{config}: {message}" in result.output, result.output


def test_an_unknown_key_left_null_still_loads(adapter, tmp_path, tiny_model_dir):
    """A newer PEFT's feature that is off (null) changes nothing: the adapter merges."""
    a = copy(adapter, tmp_path)
    config = a / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "future_feature_config": None}))
    result = runner.invoke(app, ["merge", str(a), "--out", str(tmp_path / "m"), "--base", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "config.json").is_file()


def test_an_adapter_naming_no_base_asks_for_one(adapter, tmp_path):
    """A PEFT adapter saved without base_model_name_or_path (and no recipe): merge used to crash in pydantic."""
    a = copy(adapter, tmp_path)
    config = a / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": None}))
    result = runner.invoke(app, ["merge", str(a), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"{a} names no base model" in result.output and "pass --base" in result.output


@pytest.mark.parametrize("case,change,message", [
    ("target modules the base lacks", {"target_modules": ["nope_proj"]}, "Target modules {'nope_proj'} not found"),
    ("tensors of another model's shapes", None, "size mismatch for"),
])
def test_an_adapter_of_another_model_is_named(adapter, tmp_path, tiny_model_dir, case, change, message):
    a = copy(adapter, tmp_path)
    if change:
        config = a / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    else:
        from safetensors.torch import load_file, save_file

        weights = a / "adapter_model.safetensors"
        save_file({k: torch.zeros(3, 3) for k in load_file(weights)}, weights)
    result = runner.invoke(app, ["merge", str(a), "--out", str(tmp_path / "m"), "--base", str(tiny_model_dir)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"The adapter {a} does not fit the base model" in result.output and message in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("case,text,message", [
    ("not a mapping", "- 1\n", "expected a recipe (a YAML mapping), got list"),
    ("a wrong type", "quantization: {load_in_4bit: maybe}\n", "quantization.load_in_4bit: Input should be a valid"),
    ("an alias bomb", "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6)),
     "more than 100,000 values"),
])
def test_a_hostile_recipe_beside_an_adapter_is_named(adapter, tmp_path, tiny_model_dir, case, text, message):
    a = copy(adapter, tmp_path)
    (a / "recipe.yaml").write_text(text)
    result = runner.invoke(app, ["merge", str(a), "--out", str(tmp_path / "m"), "--base", str(tiny_model_dir)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert str(a / "recipe.yaml") in result.output and message in result.output, result.output


def gguf(version=3, n_tensors=0, kv=b"", n_kv=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv


GGUF = [
    ("wrong magic", b"GGUX" + b"\0" * 100, "GGUF magic invalid"),
    ("empty", b"", "cannot mmap an empty file"),
    ("truncated header", b"GGUF\x03\0", "is not a readable GGUF file"),
    ("tensor count 10^12", gguf(n_tensors=10**12), "IndexError"),
    ("metadata count 2^62", gguf(n_kv=2**62), "IndexError"),
    ("array length 2^60", gguf(n_kv=1, kv=struct.pack("<Q", 21) + b"tokenizer.ggml.tokens" + struct.pack("<IIQ", 9, 8, 2**60)),
     "IndexError"),
    ("unknown architecture", gguf(n_kv=1, kv=struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<IQ", 8, 4)
                                  + b"nope"), "architecture nope is not supported"),
]


@pytest.mark.parametrize("case,data,message", GGUF, ids=[c[0] for c in GGUF])
def test_hostile_gguf_is_refused(tmp_path, monkeypatch, case, data, message):
    import resource

    monkeypatch.setenv("FINETUNE_GGUF_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = runner.invoke(app, ["chat", str(path), "--prompt", "hi"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert str(path) in result.output and message in result.output, result.output
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024 or sys.platform != "linux", f"peak RSS grew {grown_kib} KiB on a lying header"


@pytest.mark.parametrize("trust", [False, True])
def test_validate_names_the_code_files_a_model_directory_carries(tmp_path, tiny_tokenizer_dir, trust):
    model = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, model)
    (model / "modeling_evil.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {model}, trust_remote_code: {str(trust).lower()}}}\n"
                      f"data: {{train: {tmp_path / 't.jsonl'}}}\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    if trust:
        assert "warning: model.trust_remote_code is true" in out and "runs its Python code (modeling_evil.py)" in out
    else:
        assert "carries Python code (modeling_evil.py); it is not run, because model.trust_remote_code is false" in out


def test_cli_arguments_that_crashed_are_exit_2_naming_the_option(adapter, tmp_path, tiny_model_dir):
    """Found by hand-fuzzing the options: each was a traceback (OverflowError, ValueError from huggingface_hub,
    TypeError in the tokenizer, OSError ENAMETOOLONG), or for NaN weights a merge of NaNs with exit 0."""
    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{train: {tmp_path / 't.jsonl'}}}\n")
    long = str(tmp_path / ("x" * 300))
    merge = ["merge", str(adapter), "--out", str(tmp_path / "m"), "--base", str(tiny_model_dir)]
    for args, message in [
        (["plan", str(recipe), "--device-memory", "1e400GiB"], "--device-memory '1e400GiB' is not a size a device has"),
        ([*merge, "--max-shard-size", "huge"], "--max-shard-size 'huge' is not a size"),
        ([*merge, "--max-shard-size", "0"], "--max-shard-size '0' is not a size"),
        ([*merge[:2], str(adapter), *merge[2:], "--weights", "nan", "nan"], "--weights must be finite numbers"),
        (["chat", str(tiny_model_dir), "--prompt", "hi \udcff"], "--prompt is not valid UTF-8 text"),
        (["chat", str(tiny_model_dir), "--system", "\ud800", "--prompt", "x"], "--system is not valid UTF-8 text"),
        (["verify", long], "File name too long"),
        (["chat", long], "File name too long"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args[:3], result.output, result.exception)
        assert message in " ".join(result.output.split()), (args[:3], result.output)
    assert not (tmp_path / "m").exists()
