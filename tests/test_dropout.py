"""LoRA's dropout on CPU (finetune.model.dropout.CpuDropout): torch's distribution, a boolean mask, the global RNG."""

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
    p = round(0.05 * 2**15) / 2**15  # p rounded to 15 bits
    assert abs(dropped.double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5  # within 5 sigma of p
    kept = ~dropped
    assert torch.allclose(y[kept], x[kept] / (1 - p))  # kept values scaled by 1 / (1 - p)
    assert torch.equal(CpuDropout(0.05).eval()(x), x)  # no dropout in eval mode


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(8, 512, requires_grad=True)
    y = CpuDropout(0.2).train()(x)
    y.sum().backward()
    p = round(0.2 * 2**15) / 2**15
    expected = (y.detach() != 0).float() / (1 - p)
    assert torch.allclose(x.grad, expected)


def test_masks_come_from_the_global_generator_in_bf16_too():
    """Resume restores the global RNG: the same state must give the same mask, whatever the dtype."""
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    d = CpuDropout(0.1).train()
    torch.manual_seed(7)
    a = d(x)
    torch.manual_seed(7)
    b = d(x)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, d(x))  # and the next call draws a new mask


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_attach_lora_uses_it_for_every_adapter_on_cpu(tiny_model_dir, dropout):
    recipe = Recipe.model_validate({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["x.jsonl"]},
                                    "lora": {"dropout": dropout}})
    model = training_model(recipe)
    drops = [d for name, m in model.named_modules() if name.endswith("lora_dropout") for d in m.values()]
    assert drops
    if dropout:
        assert all(type(d) is CpuDropout and d.p == dropout for d in drops)
    else:
        assert all(type(d) is torch.nn.Identity for d in drops)
    assert not any("dropout" in k for k in model.state_dict())  # nothing new in checkpoints
