"""LoRA's dropout on CPU (finetune.model.dropout.CpuDropout): torch's distribution, a boolean mask, the global RNG,
one mask per input tensor shared by the adapters that read it."""

import gc

import pytest
import torch

from finetune.model.dropout import CpuDropout
from finetune.recipe.schema import Recipe
from conftest import training_model


def test_drops_p_of_the_values_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.randn(64, 4096, dtype=torch.float64).abs() + 1
    y = CpuDropout(0.05).train()(x)
    dropped = y == 0
    n = x.numel()
    p = round(0.05 * 2**16) / 2**16  # p rounded to 16 bits
    assert abs(dropped.double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 sigma of p
    kept = ~dropped
    assert torch.allclose(y[kept], x[kept] / (1 - p))  # kept values scaled by 1 / (1 - p)
    assert torch.equal(CpuDropout(0.05).eval()(x), x)  # no dropout in eval mode


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(8, 512, requires_grad=True)
    y = CpuDropout(0.2).train()(x)
    y.sum().backward()
    p = round(0.2 * 2**16) / 2**16
    expected = (y.detach() != 0).float() / (1 - p)
    assert torch.allclose(x.grad, expected)


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
    assert scale == pytest.approx(1 / (1 - round(0.3 * 2**16) / 2**16))
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


def recipe_layers(model) -> int:
    return model.config.num_hidden_layers
