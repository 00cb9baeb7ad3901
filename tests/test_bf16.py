"""bf16 compute on CPU: the fast path (frozen weights in bf16, LoRA in float32) keeps the numbers honest.

The tolerance: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per operation). One step's
loss agrees with float32 to 1%, and the LoRA gradient (all adapters as one vector, B randomised) points
the same way: cosine > 0.95. Measured: 0.971 on the tiny model, 0.987 on SmolLM2-135M (2 x 48 random
tokens); the earlier autocast path with float32 norms and head: 0.970 / 0.989. Single attention
gradients differ more (up to ~40% of their norm in a few q/k adapters): that is bf16 attention, in both
paths. What must hold exactly in bf16 as in float32 (resume) is tested exactly.
"""

import json

import pytest
import torch
from test_training import adapter, make_recipe, metrics, stop_after_save, train

from finetune.objectives.loss import token_loss_sum
from finetune.errors import RecipeError
from finetune.model.placement import (
    DeviceFacts, auto_compute_dtype, cpu_dtype_override, cpu_has_native_bf16, resolve_compute_dtype,
)
from finetune.recipe.schema import Recipe
from conftest import training_model


def build(model_dir, dtype: str):
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"]},
        "quantization": {"compute_dtype": dtype}, "lora": {"dropout": 0.0, "modules_to_save": ["lm_head"]},
        "training": {"gradient_checkpointing": False},
    })
    torch.manual_seed(0)
    model = training_model(recipe)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave A without gradient
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, batch, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):  # as accelerate does
        loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_one_bf16_step_agrees_with_float32_and_trains_float32_weights(tiny_model_dir):
    f32, bf16 = build(tiny_model_dir, "float32"), build(tiny_model_dir, "bfloat16")
    trained = {n: p.dtype for n, p in bf16.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}  # LoRA and modules_to_save stay float32
    assert any("modules_to_save" in n for n in trained)
    frozen = {p.dtype for n, p in bf16.named_parameters()
              if not p.requires_grad and p.dtype.is_floating_point and "original_module" not in n}  # (unused)
    assert frozen == {torch.bfloat16}  # no float32 weight left to re-cast under autocast at every use
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, f32.config.vocab_size, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    loss32, grads32 = loss_and_grads(f32, batch, "float32")
    loss16, grads16 = loss_and_grads(bf16, batch, "bfloat16")
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert grads16.keys() == grads32.keys()
    flat16, flat32 = (torch.cat([g[n].flatten() for n in sorted(grads32)]) for g in (grads16, grads32))
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.95


@pytest.mark.parametrize("facts, expected", [
    (DeviceFacts(cuda=True, cuda_bf16=True), torch.bfloat16),  # Ampere and newer
    (DeviceFacts(cuda=True, cuda_bf16=False), torch.float16),  # Volta, Turing
    (DeviceFacts(cuda=True, cuda_bf16=True, cpu_override="float32"), torch.bfloat16),  # a CPU switch, not a GPU one
    (DeviceFacts(cpu_native_bf16=True), torch.bfloat16),  # AVX512_BF16 or AMX
    (DeviceFacts(cpu_native_bf16=False), torch.float32),  # AVX2: bf16 is emulated, ~25x slower
    (DeviceFacts(cpu_native_bf16=False, cpu_override="bfloat16"), torch.bfloat16),
    (DeviceFacts(cpu_native_bf16=True, cpu_override="float32"), torch.float32),
])
def test_the_auto_rule_on_each_kind_of_device(facts, expected):
    assert auto_compute_dtype(facts) == expected
    assert resolve_compute_dtype("float32", facts) == torch.float32  # an explicit recipe value always wins
    assert resolve_compute_dtype("bfloat16", facts) == torch.bfloat16


def test_the_cpu_flags_and_the_switch_are_read_from_this_process(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert not cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert cpu_has_native_bf16()
    for value, expected in [("bf16", "bfloat16"), ("BFloat16", "bfloat16"), ("fp32", "float32"), ("", None)]:
        monkeypatch.setenv("FINETUNE_CPU_DTYPE", value)
        assert cpu_dtype_override() == expected
    monkeypatch.delenv("FINETUNE_CPU_DTYPE")
    assert cpu_dtype_override() is None
    monkeypatch.setenv("FINETUNE_CPU_DTYPE", "float16")
    with pytest.raises(RecipeError, match="FINETUNE_CPU_DTYPE='float16': expected bfloat16 or float32"):
        cpu_dtype_override()


def test_the_switch_reaches_a_run_and_its_environment_record(tmp_path, tiny_model_dir, toy_alpaca_rows, monkeypatch):
    """With the CPU saying float32, FINETUNE_CPU_DTYPE=bfloat16 trains in bf16 (frozen weights bf16) and says so;
    an invalid value is exit 2 naming the variable, before any model loads."""
    from conftest import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows)
    write_jsonl(tmp_path / "eval.jsonl", toy_alpaca_rows[:4])
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    monkeypatch.setenv("FINETUNE_CPU_DTYPE", "bfloat16")
    recipe = make_recipe(tmp_path / "r", tiny_model_dir, tmp_path, name="sw", quantization={"load_in_4bit": False},
                         max_steps=1)
    result = train(recipe)
    assert result.exit_code == 0, result.output
    assert "compute dtype bfloat16" in result.output
    env = json.loads((tmp_path / "r" / "runs" / "sw" / "environment.json").read_text())
    assert env["cpu_native_bf16"] is False and env["cpu_dtype_override"] == "bfloat16"
    monkeypatch.setenv("FINETUNE_CPU_DTYPE", "half")
    result = train(recipe, "--overwrite")
    assert result.exit_code == 2 and "FINETUNE_CPU_DTYPE='half'" in result.output and "Traceback" not in result.output


def test_bf16_resume_on_a_4bit_base_is_exact(tmp_path, tiny_model_dir, toy_alpaca_rows, monkeypatch):
    from conftest import write_jsonl

    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows)
    write_jsonl(tmp_path / "eval.jsonl", toy_alpaca_rows[:4])
    quant = {"load_in_4bit": True, "compute_dtype": "bfloat16"}
    straight = make_recipe(tmp_path / "a", tiny_model_dir, tmp_path, name="a", quantization=quant, max_steps=4)
    assert train(straight).exit_code == 0
    resumed = make_recipe(tmp_path / "b", tiny_model_dir, tmp_path, name="b", quantization=quant, max_steps=4,
                          save_steps=2)
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code != 0
    result = train(resumed, "--resume")
    assert result.exit_code == 0, result.output
    a, b = tmp_path / "a" / "runs" / "a", tmp_path / "b" / "runs" / "b"
    assert [r["loss"] for r in metrics(a) if "loss" in r] == [r["loss"] for r in metrics(b) if "loss" in r]
    wa, wb = adapter(a / "checkpoint-final"), adapter(b / "checkpoint-final")
    assert wa.keys() == wb.keys() and all(w.dtype == torch.float32 and torch.equal(w, wb[k]) for k, w in wa.items())
