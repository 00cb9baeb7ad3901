"""DPO and ORPO: the losses of the paper formulas, computed without wasted logits, on one loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.data import IGNORE, Collator, flatten
from finetune.model import attach_lora, load_base_model
from finetune.objectives import DPO, ORPO
from finetune.recipe import Recipe


def recipe_for(model_dir, **sections) -> Recipe:
    return Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"], "format": "preference"},
        "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False, "objective": "dpo"}, **sections,
    })


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny 4-bit model with LoRA B randomised, so that the policy differs from the reference."""
    recipe = recipe_for(tiny_model_dir)
    m = attach_lora(load_base_model(recipe.model, recipe.quantization), recipe)
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return m


def example(prompt: list[int], answer: list[int]) -> dict:
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def pairs(vocab: int, n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """n (chosen, rejected) pairs of random tokens with prompts and answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (4 + 3 * i,), generator=g).tolist()
        chosen = torch.randint(3, vocab, (5 + i,), generator=g).tolist()
        rejected = torch.randint(3, vocab, (7 - i % 3,), generator=g).tolist()
        out.append((example(prompt, chosen), example(prompt, rejected)))
    return out


def collate(ps, padding_free=False) -> dict:
    return Collator(pad_id=0, padding_free=padding_free)([x for p in ps for x in p])


def plain_logp(model, ex: dict) -> torch.Tensor:
    """Summed log-probability of the answer tokens from the model's full logits, one unpadded sequence."""
    ids = torch.tensor([ex["input_ids"]])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    labels = torch.tensor(ex["labels"][1:])
    keep = labels != IGNORE
    return F.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep][:, None]).sum()


def plain_terms(model, ps):
    """(policy logp, reference logp, answer length) per sequence, from independent plain forward passes."""
    with torch.no_grad():
        policy = torch.stack([plain_logp(model, x) for p in ps for x in p])
        with model.disable_adapter():
            ref = torch.stack([plain_logp(model, x) for p in ps for x in p])
    lengths = torch.tensor([float(sum(t != IGNORE for t in x["labels"][1:])) for p in ps for x in p])
    return policy, ref, lengths


@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_is_the_paper_formula(model, tiny_model_dir, loss, smoothing):
    beta = 0.3
    objective = DPO(recipe_for(tiny_model_dir, dpo={"beta": beta, "loss": loss, "label_smoothing": smoothing}))
    ps = pairs(model.config.vocab_size, 3)
    with torch.no_grad():
        out = objective(model, collate(ps))
    p, q, n = plain_terms(model, ps)
    if loss == "ipo":
        p, q = p / n, q / n
    m = (p[0::2] - p[1::2]) - (q[0::2] - q[1::2])
    expected = (m - 1 / (2 * beta)) ** 2 if loss == "ipo" else \
        -(1 - smoothing) * F.logsigmoid(beta * m) - smoothing * F.logsigmoid(-beta * m)
    assert out.total.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    chosen, rejected = beta * (p[0::2] - q[0::2]), beta * (p[1::2] - q[1::2])
    assert out.metrics["rewards/margin"].item() == pytest.approx((chosen - rejected).sum().item(), rel=1e-4, abs=1e-6)
    assert out.metrics["rewards/accuracy"].item() == (chosen > rejected).sum().item()
    assert objective.units(collate(ps)) == 3


def test_orpo_loss_is_the_paper_formula(model, tiny_model_dir):
    objective = ORPO(recipe_for(tiny_model_dir, training={"objective": "orpo"}, orpo={"lambda": 0.5}))
    ps = pairs(model.config.vocab_size, 3, seed=1)
    with torch.no_grad():
        out = objective(model, collate(ps))
    p, _, n = plain_terms(model, ps)
    mean = (p / n).double()
    log_odds = mean - torch.log(1 - torch.exp(mean))
    expected = -mean[0::2] - 0.5 * F.logsigmoid(log_odds[0::2] - log_odds[1::2])
    assert out.total.item() == pytest.approx(expected.sum().item(), rel=1e-5)


@pytest.mark.parametrize("objective_class", [DPO, ORPO])
def test_a_pairs_loss_does_not_depend_on_padding_or_batch_company(model, tiny_model_dir, objective_class):
    objective = objective_class(recipe_for(tiny_model_dir))
    ps = pairs(model.config.vocab_size, 4, seed=2)
    with torch.no_grad():
        alone = torch.stack([objective(model, collate([p])).total for p in ps])
        together = objective(model, collate(ps)).total  # padded to the longest of the four
        padding_free = objective(model, collate(ps, padding_free=True)).total  # one row, no padding
    assert together.item() == pytest.approx(alone.sum().item(), rel=1e-5)
    assert padding_free.item() == pytest.approx(alone.sum().item(), rel=1e-5)
    assert objective.units(collate(ps, padding_free=True)) == 4


def test_at_the_start_the_policy_is_the_reference_and_dpo_loss_is_log_2(tiny_model_dir):
    recipe = recipe_for(tiny_model_dir)
    fresh = attach_lora(load_base_model(recipe.model, recipe.quantization), recipe)  # LoRA B = 0
    ps = pairs(fresh.config.vocab_size, 3, seed=3)
    out = DPO(recipe)(fresh, collate(ps))
    assert out.total.item() / 3 == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/chosen"].item() == out.metrics["rewards/rejected"].item() == 0.0


def test_gradient_accumulation_1x4_equals_4x1(model, tiny_model_dir):
    """The loop divides each micro batch's summed loss by the step's pairs: the same gradient either way."""
    objective = DPO(recipe_for(tiny_model_dir))
    ps = pairs(model.config.vocab_size, 4, seed=4)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_batches):
        model.zero_grad(set_to_none=True)
        for mb in micro_batches:
            (objective(model, collate(mb)).total / len(ps)).backward()
        return [p.grad.clone() for p in trainable]

    one, four = grads([ps]), grads([[p] for p in ps])
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_flatten_keeps_pairs_in_order():
    ps = [(example([5, 6], [7]), example([5, 6], [8, 9]))]
    row = flatten([x for p in ps for x in p])
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
