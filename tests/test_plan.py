"""`finetune plan`: the weight, LoRA and optimizer terms must be exactly what training allocates."""

import bitsandbytes as bnb
import pytest
import torch

from finetune.errors import RecipeError
from finetune.objectives.loss import token_loss_sum
from finetune.plan.memory import parse_size, plan
from finetune.plan.terms import activation_bytes, meta_model, optimizer_bytes, weight_bytes
from finetune.recipe.schema import Recipe, TrainingSection
from finetune.model.load import make_optimizer
from conftest import training_model, load_base


def fp32_placement(recipe):
    """The run's placement with float32 compute, whatever this CPU would pick."""
    import dataclasses

    from finetune.model import resolve

    return dataclasses.replace(resolve(recipe.quantization), compute_dtype=torch.float32)


def _recipe(model_dir, **lora) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"], "max_length": 24},
        "quantization": {"compute_dtype": "float32"}, "lora": lora,
        "training": {"gradient_checkpointing": False, "micro_batch_size": 2},
    })


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared tables count once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _quant_tensors(model):
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            yield from (module.weight.data, qs.absmax, qs.code)
            if qs.nested:
                yield from (qs.offset, qs.state2.absmax, qs.state2.code)


@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_terms_match_the_loaded_model(tiny_model_dir, double_quant):
    recipe = _recipe(tiny_model_dir).model_copy(deep=True)
    recipe.quantization.double_quant = double_quant
    real = load_base(recipe.model, recipe.quantization)
    quantized, kept = weight_bytes(meta_model(recipe, fp32_placement(recipe))[0], width=4)
    assert quantized == _storage_bytes(_quant_tensors(real))
    plain = [p for p in real.parameters() if not isinstance(p, bnb.nn.Params4bit)]
    assert kept == _storage_bytes(plain)


@pytest.mark.parametrize("lora", [{}, {"r": 64, "target_modules": ["q_proj", "v_proj"]}])
@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"])
def test_lora_and_optimizer_terms_match_training(tiny_model_dir, lora, optimizer):
    """r=64 makes some adapters >= 4096 values, so the 8-bit optimizer mixes 8-bit and 32-bit states."""
    recipe = _recipe(tiny_model_dir, **lora)
    model = training_model(recipe)
    planned = [p for p in meta_model(recipe, fp32_placement(recipe))[0].parameters() if p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sorted(p.shape for p in planned) == sorted(p.shape for p in trained)

    opt = make_optimizer(model, TrainingSection(optimizer=optimizer))
    for p in trained:
        p.grad = torch.ones_like(p)
    opt.step()
    states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert optimizer_bytes(planned, optimizer) == _storage_bytes(states)


def saved_activation_bytes(model, batch: dict | None = None) -> int:
    """Bytes autograd keeps for backward in one training pass over `batch`, by default a (2, 24) batch (10 prompt
    tokens unlabelled), the parameters' own storage excluded: what the planner's activation term predicts."""
    model.train()
    if batch is None:
        ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
        labels = ids.clone()
        labels[:, :10] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        token_loss_sum(model, batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in params)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activation_term_is_close_to_what_autograd_saves(tiny_model_dir, dropout):
    recipe = _recipe(tiny_model_dir, dropout=dropout)
    model = training_model(recipe)
    measured = saved_activation_bytes(model)
    planned = activation_bytes(meta_model(recipe, fp32_placement(recipe))[0], recipe, 2, 24, 4, checkpointing=False)
    assert planned == pytest.approx(measured, rel=0.1)


def test_plan_totals_and_verdict(tiny_model_dir):
    recipe = _recipe(tiny_model_dir)
    p = plan(recipe, device="cpu", seq_length=24)
    assert p.total == sum(t.bytes for t in p.terms if t.counted)
    assert p.term("activations").bytes > p.term("activations with checkpointing").bytes
    # the runtime term is this process's resident memory, which grows over a test session: size by the total
    roomy = plan(recipe, device_memory=2 * p.total, device="cpu", seq_length=24)
    assert roomy.verdict.startswith("fits")
    tight = plan(recipe, device_memory=p.total // 2, device="cpu", seq_length=24)
    assert tight.verdict.startswith("does not fit")


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("512mib") == 512 * 2**20
    with pytest.raises(RecipeError, match="not a size"):
        parse_size("lots")


def test_plan_command(tmp_path, tiny_model_dir, toy_alpaca_rows):
    """The CLI verb reads the recipe and its data (the longest example sets the batch width) and prints a verdict."""
    import yaml
    from typer.testing import CliRunner

    from conftest import write_jsonl
    from finetune.cli import app

    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows[:8])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "train.jsonl")},
        "training": {"micro_batch_size": 2},
    }))
    out = CliRunner().invoke(app, ["plan", str(recipe), "--device-memory", "1KiB"])
    assert out.exit_code == 0, out.output
    assert "longest training example" in out.output and "does not fit" in out.output
    bad = CliRunner().invoke(app, ["plan", str(recipe), "--device-memory", "lots"])
    assert bad.exit_code == 2 and "not a size" in bad.output


def test_padding_free_plans_the_fullest_unpadded_row(tmp_path, tiny_model_dir, toy_alpaca_rows):
    """Padded, the widest batch is micro_batch x longest; padding-free, it is the k longest examples end to end."""
    from conftest import write_jsonl
    from finetune.data import prepare_data
    from finetune.model.load import load_tokenizer
    from finetune.plan.memory import _sequence_length

    write_jsonl(tmp_path / "train.jsonl", toy_alpaca_rows[:12])
    body = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "train.jsonl")},
            "training": {"micro_batch_size": 3}}
    padded = Recipe.model_validate(body)
    free = Recipe.model_validate({**body, "training": {"micro_batch_size": 3, "padding_free": True}})
    lengths = sorted(prepare_data(padded.data, load_tokenizer(str(tiny_model_dir)), 42).stats.lengths)
    assert lengths[0] < lengths[-1]  # otherwise the two plans could not differ
    assert _sequence_length(padded)[0] == lengths[-1]
    seq, note = _sequence_length(free)
    assert 3 * (seq - 1) < sum(lengths[-3:]) <= 3 * seq < 3 * lengths[-1] and "padding-free" in note


def test_adamix_consistency_plans_the_two_forwards_it_trains(tiny_model_dir):
    """AdaMix's consistency term runs and trains a second forward of each micro batch: the saved activations and
    the loss's rows are counted twice (on SmolLM2's quickstart the plan said 3.86 GiB for a 5.59 GiB peak)."""
    def planned(weight):
        body = _recipe(tiny_model_dir).model_dump()
        body["adapter"], body["adamix"] = {"method": "adamix"}, {"num_adapters": 2, "consistency_weight": weight}
        return plan(Recipe.model_validate(body), device="cpu", seq_length=24)

    one, two = planned(0.0), planned(1.0)
    assert two.term("activations").bytes == 2 * one.term("activations").bytes > 0
    loss = "loss (labelled positions, chunked)"
    assert two.term(loss).bytes == 2 * one.term(loss).bytes  # both forwards' rows fit one chunk of logits here
    assert "two forwards" in two.term("activations").note


def test_activation_term_counts_what_bf16_segmented_attention_saves(tiny_model_dir, monkeypatch):
    """A padding-free bf16 row on CPU: an example of at most attention.MATH_MAX_TOKENS tokens attends by matrix
    products and keeps its [heads, n, n] probabilities for backward, a longer one through SDPA's flash kernel keeps
    only its output and log-sum-exp. What the products keep beyond flash is what the planner adds for them (the
    rest of the bf16 term is checked elsewhere), and they run only where they are meant to."""
    from finetune.model import attention, resolve

    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["unused.jsonl"], "max_length": 160},
        "quantization": {"compute_dtype": "bfloat16"}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False, "micro_batch_size": 1, "padding_free": True},
    })
    model = training_model(recipe)
    assert attention.use_segmented_attention(model)
    n = 160
    ids = torch.randint(3, 500, (1, n), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "position_ids": torch.arange(n)[None], "labels": labels}
    products = []
    monkeypatch.setattr(attention, "causal_attention_math",
                        lambda *a, f=attention.causal_attention_math: products.append(1) or f(*a))
    with_products = saved_activation_bytes(model, batch)
    assert len(products) == 2  # one example, two layers
    meta = meta_model(recipe, resolve(recipe.quantization))[0]
    planned = activation_bytes(meta, recipe, 1, n, 2, checkpointing=False, device="cpu")
    monkeypatch.setattr(attention, "MATH_MAX_TOKENS", n - 1)
    with_flash = saved_activation_bytes(model, batch)
    assert len(products) == 2
    padded = recipe.model_copy(update={"training": recipe.training.model_copy(update={"padding_free": False})})
    without = activation_bytes(meta, padded, 1, n, 2, checkpointing=False, device="cpu")  # no segmented attention
    assert planned - without == pytest.approx(with_products - with_flash, rel=0.1)
