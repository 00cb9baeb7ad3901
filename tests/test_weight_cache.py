"""The dequantized weight cache of an NF4 base (quantization.cache_dequantized; finetune/model/weight_cache.py):
the same losses and gradients to the bit as bitsandbytes' own forward in both CPU dtypes, the same run through
the CLI, what the planner counts and decides, and the settings it refuses. (GGUF bases: test_quantized_base.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import ModelError
from finetune.model import Placement, cache_weights, dequantized_bytes
from finetune.model.grouped import ungroup
from finetune.model.weight_cache import linear4bit_weight
from finetune.objectives.loss import token_loss_sum
from finetune.recipe import load_recipe

from conftest import recipe_file, task_data, training_model
from test_training import losses, one_thread  # noqa: F401  (autouse: one thread for tiny matmuls)

runner = CliRunner()


def nf4_model(tmp_path, model_dir, dtype: str, **lora):
    recipe = load_recipe(recipe_file(tmp_path, model_dir, task_data(tmp_path), quantization={
        "load_in_4bit": True, "compute_dtype": dtype}, lora={"target_modules": "all-linear", **lora}))
    torch.manual_seed(0)
    model = training_model(recipe)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave A without gradient
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def loss_and_grads(model, batch, dtype: str):
    torch.manual_seed(3)  # the same dropout masks in every call
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):  # as accelerate does
        loss = token_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cache_gives_bitsandbytes_numbers_to_the_bit(tmp_path, tiny_model_dir, dtype):
    model = nf4_model(tmp_path, tiny_model_dir, dtype)
    ungroup(model)  # each layer alone, as bitsandbytes computes it (the grouped siblings: test_grouped.py)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 14  # 7 per decoder layer, 2 layers
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    plain = loss_and_grads(model, batch, dtype)
    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert cache_weights(model, getattr(torch, dtype)) == dequantized_bytes(model, getattr(torch, dtype)) == \
        sum(m.in_features * m.out_features * width for m in layers)
    w = layers[0].cached_weight
    assert w.dtype == getattr(torch, dtype) and w.shape == (layers[0].out_features, layers[0].in_features)
    cached = loss_and_grads(model, batch, dtype)
    assert len(plain[1]) == 28 and plain[1].keys() == cached[1].keys()
    assert torch.equal(plain[0], cached[0])
    assert all(torch.equal(g, cached[1][n]) for n, g in plain[1].items())
    # the products read the kept weight: a change to it changes the loss (nothing dequantizes behind it)
    with torch.no_grad():
        w.mul_(1.5)
    assert not torch.equal(loss_and_grads(model, batch, dtype)[0], plain[0])
    cache_weights(model, None)
    assert torch.equal(loss_and_grads(model, batch, dtype)[0], plain[0])  # dropped: bitsandbytes' forward again
    assert not any(hasattr(m, "cached_weight") for m in layers)


def test_the_kept_weight_is_no_buffer_and_survives_train_and_eval(tmp_path, tiny_model_dir):
    model = nf4_model(tmp_path, tiny_model_dir, "float32")
    keys = set(model.state_dict())
    cache_weights(model, torch.float32)
    assert set(model.state_dict()) == keys  # checkpoints unchanged, and DDP broadcasts no 4-bit layer's copy
    assert not any("cached_weight" in name for name, _ in model.named_buffers())
    model.eval()
    model.train()
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
    assert torch.equal(layer.cached_weight, linear4bit_weight(layer, torch.float32))
    x = torch.randn(3, layer.in_features)
    assert torch.equal(layer(x), type(layer).forward(layer, x))  # the kept weight, the same product


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One NF4 run with the cache, one without (the dtype leg's compute dtype), 4 optimizer steps of all-linear LoRA."""
    tmp = tmp_path_factory.mktemp("weight_cache")
    data = task_data(tmp)
    out = {}
    for cache in (True, False):
        path = recipe_file(tmp, tiny_model_dir, data, f"cache-{cache}", max_steps=4,
                           quantization={"load_in_4bit": True, "cache_dequantized": cache},
                           lora={"target_modules": "all-linear"})
        result = runner.invoke(app, ["train", str(path)])
        assert result.exit_code == 0, result.output
        out[cache] = (path, tmp / "runs" / f"cache-{cache}", " ".join(result.output.split()))
    return out


def test_a_run_with_the_cache_is_the_run_without_it(runs):
    """The same run within the compute dtype's rounding: with the cache, q/k/v and gate/up also run as one node per
    group (finetune/model/grouped.py), whose sums take another order; the cache alone gives the same bits (above)."""
    (path, cached, said_on), (_, plain, said_off) = runs[True], runs[False]
    assert "base: NF4 (bitsandbytes), dequantized once and cached" in said_on
    assert "base: NF4 (bitsandbytes), dequantized at every forward" in said_off
    tol = 1e-5 if cpu_width(load_recipe(path)) == 4 else 2e-2  # relative; bf16: 8 bits of mantissa, 4 steps
    assert losses(cached) == pytest.approx(losses(plain), rel=tol) and len(losses(cached)) == 4
    evals = [[m["eval_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "eval_loss" in m] for run in (cached, plain)]
    assert evals[0] == pytest.approx(evals[1], rel=tol) and evals[0]
    a, b = (load_file(run / "checkpoint-final" / "adapter_model.safetensors") for run in (cached, plain))
    assert a.keys() == b.keys()
    assert all(((t - b[k]).norm() / b[k].norm()).item() < 10 * tol for k, t in a.items())


def test_the_plan_counts_the_cache_where_it_fits_on_the_cpu(runs):
    from finetune.plan import CACHE_TERM, plan

    path = runs[True][0]
    auto = load_recipe(path, ["quantization.cache_dequantized=auto"])
    p = plan(auto, device="cpu", device_memory=2**40)
    term = p.term(CACHE_TERM)
    # the tiny Llama: q, o 64 x 64; k, v 32 x 64; gate, up, down 64 x 128; two layers; in the compute dtype
    assert term.bytes == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128) * cpu_width(auto)
    assert term.counted and "auto: fits within 50% of the memory" in term.note
    tight = plan(auto, device="cpu", device_memory=p.total - term.bytes)
    assert not tight.term(CACHE_TERM).counted and "would not fit" in tight.term(CACHE_TERM).note
    # an NF4 base caches within half the memory only (a GGUF base within 90%: test_quantized_base.py)
    assert not plan(auto, device="cpu", device_memory=int(p.total / 0.7)).term(CACHE_TERM).counted
    assert plan(auto, device="cpu", device_memory=int(p.total / 0.45)).term(CACHE_TERM).counted
    on_gpu = plan(auto, device="cuda", device_memory=2**40).term(CACHE_TERM)
    assert not on_gpu.counted and "off on a GPU" in on_gpu.note
    forced = plan(load_recipe(path), device="cuda", device_memory=2**40).term(CACHE_TERM)
    assert forced.counted and "set" in forced.note
    off = plan(load_recipe(runs[False][0]), device="cpu", device_memory=2**40).term(CACHE_TERM)
    assert not off.counted


def cpu_width(recipe) -> int:
    """Bytes per value of the compute dtype a CPU run of `recipe` takes (auto: this CPU's, as the plan decides)."""
    import dataclasses

    from finetune.model import DeviceFacts, auto_compute_dtype, resolve

    dtype = resolve(recipe.quantization).compute_dtype
    if recipe.quantization.compute_dtype == "auto":
        dtype = auto_compute_dtype(dataclasses.replace(DeviceFacts.probe(), cuda=False))
    return torch.empty((), dtype=dtype).element_size()


def test_the_cache_is_refused_where_it_cannot_apply(tmp_path, tiny_model_dir):
    from finetune.train.setup import _cache_dequantized

    data = task_data(tmp_path)
    float_base = recipe_file(tmp_path, tiny_model_dir, data, quantization={"cache_dequantized": True})
    result = runner.invoke(app, ["validate", str(float_base)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "quantization.cache_dequantized" in text and "load_in_4bit is false" in text
    assert "Traceback" not in result.output
    fsdp = Placement(torch.float32, torch.float32, "fsdp", shards_parameters=True, fsdp_version=2)
    nf4 = {"load_in_4bit": True}
    for choice, expected in ((True, ModelError), ("auto", False), (False, False)):
        recipe = load_recipe(recipe_file(tmp_path, tiny_model_dir, data, quantization={**nf4,
                                                                                       "cache_dequantized": choice}))
        if expected is ModelError:
            with pytest.raises(ModelError, match="fsdp shards the 4-bit weights"):
                _cache_dequantized(recipe, None, torch.device("cpu"), fsdp)
        else:  # sharded: never cached, and the model is not touched
            assert _cache_dequantized(recipe, None, torch.device("cpu"), fsdp) is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoding_in_training_borrows_the_kept_weights(tmp_path, tiny_model_dir, dtype):
    """GRPO's rollouts and training's generation metrics decode from the training model: its kept weights are the
    decode step's dense weights (no second copy, nothing dequantized again) and the tokens are the same."""
    from transformers import AutoTokenizer

    from finetune.generate import weights
    from finetune.generate.decode import GenerationOptions, generate_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(t)["input_ids"] for t in ("Hello there", "The quick brown fox", "Repeat the word twice.")]
    options = GenerationOptions(max_new_tokens=8, batch_size=2)
    plain, cached = (nf4_model(tmp_path / name, tiny_model_dir, dtype).eval() for name in ("plain", "cached"))
    cache_weights(cached, getattr(torch, dtype))
    assert weights.dense_bytes(cached) == 0 < weights.dense_bytes(plain)
    layers = [m for m in cached.modules() if type(m).__name__ == "Linear4bit"]
    assert all(weights.dense_weight(m) is m.cached_weight for m in layers)
    ids = generate_ids(cached, tok, prompts, options)
    assert ids == generate_ids(plain, tok, prompts, options) and all(len(i) > 0 for i in ids)
    assert not any(hasattr(m.weight, weights.DENSE) for m in layers)
