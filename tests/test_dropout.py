"""LoRA's dropout on CPU (finetune.model.dropout.CpuDropout): torch's distribution, dropped positions drawn as
geometric gaps (a byte mask above p = 1/8 and for runs begun before), the global RNG, one draw per input tensor
shared by the adapters that read it."""

import gc

import pytest
import torch

from finetune.model import attach_lora, load_base_model, resolve
from finetune.model.dropout import CpuDropout, drop_positions
from finetune.recipe.schema import Recipe
from conftest import training_model


@pytest.mark.parametrize("p,positions,rounded", [(0.05, True, 0.05), (0.125, True, 0.125),
                                                 (0.05, False, round(0.05 * 2**16) / 2**16),  # a run begun before
                                                 (0.3, True, round(0.3 * 2**16) / 2**16)])  # above 1/8: a byte mask
def test_drops_p_of_the_values_and_keeps_the_expectation(p, positions, rounded):
    torch.manual_seed(0)
    x = torch.randn(64, 4096, dtype=torch.float64).abs() + 1
    d = CpuDropout(p, positions).train()
    assert d.positions == (positions and p <= 0.125)
    y = d(x)
    dropped = y == 0
    n = x.numel()
    assert abs(dropped.double().mean().item() - rounded) < 5 * (rounded * (1 - rounded) / n) ** 0.5  # 5 sigma
    kept = ~dropped
    assert torch.allclose(y[kept], x[kept] / (1 - rounded))  # kept values scaled by 1 / (1 - p)
    assert torch.equal(CpuDropout(p, positions).eval()(x), x)  # no dropout in eval mode


@pytest.mark.parametrize("p", [0.01, 0.05, 0.125])
def test_dropped_positions_are_independent_draws_of_p(p):
    """Geometric gaps give i.i.d. Bernoulli(p) drops: the rate, pairs of neighbours (p^2), and the first and last
    positions of the range (no edge left out or favoured), each within 5 sigma over many draws."""
    torch.manual_seed(3)
    n, draws = 5000, 400
    hits = torch.zeros(n, dtype=torch.float64)
    pairs = 0
    for _ in range(draws):
        pos = drop_positions(n, p)
        assert pos.dtype == torch.int64 and (pos[1:] > pos[:-1]).all() and pos[0] >= 0 and pos[-1] < n
        mask = torch.zeros(n, dtype=torch.bool)
        mask[pos] = True
        hits += mask
        pairs += (mask[1:] & mask[:-1]).sum().item()
    total = n * draws
    sigma = lambda q, m: 5 * (q * (1 - q) / m) ** 0.5
    assert abs(hits.sum().item() / total - p) < sigma(p, total)
    assert abs(pairs / ((n - 1) * draws) - p * p) < sigma(p * p, (n - 1) * draws) * 2  # neighbours overlap
    for edge in (hits[:50], hits[-50:]):  # the first and last 50 positions
        assert abs(edge.sum().item() / (50 * draws) - p) < sigma(p, 50 * draws)
    assert len(drop_positions(0, p)) == 0 and drop_positions(1, 0.999999).tolist() == [0]


@pytest.mark.parametrize("p", [0.1, 0.2])  # positions, a byte mask
def test_gradient_is_the_mask_times_the_scale(p):
    torch.manual_seed(1)
    x = torch.randn(8, 512, requires_grad=True)
    d = CpuDropout(p).train()
    y = d(x)
    y.sum().backward()
    expected = (y.detach() != 0).float() * d.scale
    assert torch.allclose(x.grad, expected)
    assert d.scale == pytest.approx(1 / (1 - (p if p <= 0.125 else round(p * 2**16) / 2**16)), rel=1e-12)


def test_the_unscaled_form_zeroes_the_drawn_positions_of_a_bf16_input():
    """The fused LoRA forward's form: a copy with zeros at exactly `drop_positions`' draw from the same generator
    state, nothing else changed, its gradient zero there and one elsewhere."""
    x = torch.randn(7, 300, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(5)
    zeroed, scale = CpuDropout(0.1).train().dropped(x)
    torch.manual_seed(5)
    pos = drop_positions(x.numel(), 0.1)
    expected = x.detach().reshape(-1).clone()
    expected[pos] = 0
    assert scale == 1 / 0.9 and zeroed.dtype == torch.bfloat16 and torch.equal(zeroed.reshape(-1), expected)
    zeroed.sum().backward()
    grad = torch.ones(x.numel(), dtype=torch.bfloat16)
    grad[pos] = 0
    assert torch.equal(x.grad.reshape(-1), grad)


def test_masks_come_from_the_global_generator_in_bf16_too():
    """Resume restores the global RNG: the same state must give the same mask, whatever the dtype."""
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    d = CpuDropout(0.1).train()
    torch.manual_seed(7)
    a = d(x)
    torch.manual_seed(7)
    b = d(x.clone())  # another tensor (the same one would reuse its mask without drawing)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, d(x.clone()))  # and the next input draws a new mask


def test_one_mask_per_input_tensor():
    """Adapters reading the same tensor share its mask (drawn once); another tensor, even of equal values, gets
    its own; the kept copy goes when its input does."""
    d = CpuDropout(0.3).train()
    x = torch.randn(16, 256)
    a, b = d(x), d(x)
    assert a is b  # q, k and v read one tensor: one mask, one dropped copy for backward
    zeroed, scale = d.dropped(x)
    assert scale == 1.0 and zeroed is a  # the fused forward takes the scaled copy as it is
    y = x.clone()
    c = d(y)
    assert not torch.equal(c == 0, a == 0)  # a new tensor draws a new mask
    zeroed, scale = d.dropped(torch.ones(4, 512))  # the unscaled form, the scale left to the product
    assert scale == pytest.approx(1 / (1 - round(0.3 * 2**16) / 2**16))  # above 1/8: a byte mask
    assert set(zeroed.unique().tolist()) == {0.0, 1.0}
    del x, y, a, b, c, zeroed
    gc.collect()
    assert d._cache is None  # nothing outlives its input


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_attach_lora_uses_it_for_every_adapter_on_cpu(tiny_model_dir, dropout):
    recipe = Recipe.model_validate({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["x.jsonl"]},
                                    "lora": {"dropout": dropout}})
    model = training_model(recipe)
    drops = {name: m["default"] for name, m in model.named_modules(remove_duplicate=False)
             if name.endswith("lora_dropout")}
    assert drops
    if dropout:
        assert all(type(d) is CpuDropout and d.p == dropout for d in drops.values())
        attention = {id(d) for name, d in drops.items() if ".layers.0.self_attn." in name}
        mlp = {id(d) for name, d in drops.items() if ".layers.0.mlp." in name}
        assert len(attention) == len(mlp) == 1 and attention != mlp  # one instance per module
        assert len({id(d) for d in drops.values()}) == 2 * recipe_layers(model)
    else:
        assert all(type(d) is torch.nn.Identity for d in drops.values())
    assert not any("dropout" in k for k in model.state_dict())  # nothing new in checkpoints


@pytest.mark.parametrize("masks,kind", [("positions", "positions"), ("shared", "byte mask"),
                                        ("per adapter", "PerAdapterDropout")])
def test_a_resumed_run_draws_as_it_began(tiny_model_dir, masks, kind):
    """records.dropout_masks says how a run began (environment.json); use_cpu_dropout draws that way again."""
    recipe = Recipe.model_validate({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["x.jsonl"]},
                                    "lora": {"dropout": 0.05}})
    placement = resolve(recipe.quantization)
    model = attach_lora(load_base_model(recipe.model, recipe.quantization, "cpu", placement), recipe, placement, masks)
    drops = [m["default"] for name, m in model.named_modules() if name.endswith("lora_dropout")]
    kinds = {"PerAdapterDropout" if type(d).__name__ == "PerAdapterDropout" else
             "positions" if d.positions else "byte mask" for d in drops}
    assert kinds == {kind}


def recipe_layers(model) -> int:
    return model.config.num_hidden_layers
