"""The labelled-positions-only loss must be the plain full-logits cross-entropy, value and gradient."""

import warnings

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from finetune.objectives import loss as loss_module
from finetune.objectives.loss import IGNORE, _full_logits_loss, token_loss_sum
from finetune.recipe.schema import Recipe
from conftest import training_model


def _batch(vocab: int) -> dict:
    """Two rows: a prompt (no labels) then a response, the second row right-padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :10] = IGNORE  # prompt
    labels[1, 18:] = IGNORE  # padding
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _plain(model, batch) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return _full_logits_loss(model(**inputs, use_cache=False).logits, batch["labels"])


def _value_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _qlora(model_dir):
    """The fixture model under float32 LoRA without dropout, its B initialised away from 0."""
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"]},
        "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False},
    })
    model = training_model(recipe)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave A without gradient
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="module")
def qlora_model(tiny_model_dir):
    return _qlora(tiny_model_dir)


@pytest.mark.parametrize("chunk_bytes", [loss_module.CHUNK_BYTES, 4 * 512 * 3])  # one chunk; 3-row chunks
def test_qlora_loss_and_gradients_match_full_logits(qlora_model, monkeypatch, chunk_bytes):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_bytes)
    batch = _batch(qlora_model.config.vocab_size)
    fast, fast_grads = _value_and_grads(token_loss_sum, qlora_model, batch)
    plain, plain_grads = _value_and_grads(_plain, qlora_model, batch)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-5)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    for name in plain_grads:
        scale = plain_grads[name].abs().max().item()  # float32 summation order differs: compare to the scale
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5 * scale)


def test_no_grad_loss_matches(qlora_model):
    batch = _batch(qlora_model.config.vocab_size)
    with torch.no_grad():
        assert token_loss_sum(qlora_model, batch).item() == pytest.approx(_plain(qlora_model, batch).item(), rel=1e-5)


def _transforming_model(family: str):
    """A 1-layer model of a family whose forward transforms the head's logits, with a transform large enough to
    matter at these logits' size; the head (tied with the input embeddings) frozen, as under LoRA."""
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    shape = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}
    config, cls = {
        "gemma2": (lambda: Gemma2Config(**shape, head_dim=16, final_logit_softcapping=1.0), Gemma2ForCausalLM),
        "granite": (lambda: GraniteConfig(**shape, logits_scaling=0.25), GraniteForCausalLM),
        "cohere": (lambda: CohereConfig(**shape, logit_scale=4.0), CohereForCausalLM),
    }[family]
    torch.manual_seed(0)
    model = cls(config())
    model.get_output_embeddings().weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_soft_capped_and_rescaled_logits_keep_the_labelled_positions_path(family, temperature):
    """Gemma 2 soft-caps logits after the head, Granite and Cohere rescale them: the loss applies the same transform
    (value and gradient of cap * tanh(z / cap), and of the scale, over logits / temperature) instead of taking the
    model's full logits, and says nothing."""
    model = _transforming_model(family)
    batch = _batch(model.config.vocab_size)

    def plain(model, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        return _full_logits_loss(model(**inputs, use_cache=False).logits / temperature, batch["labels"])

    def labelled(model, batch):
        return loss_module.token_losses(model, batch, temperature)[0].sum()

    shapes = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast, fast_grads = _value_and_grads(labelled, model, batch)
    assert shapes[0] == 1  # the model's own head on one position: the full logits were never computed
    reference, plain_grads = _value_and_grads(plain, model, batch)
    assert fast.item() == pytest.approx(reference.item(), rel=1e-6)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_a_transform_the_loss_does_not_know_gets_the_plain_loss(monkeypatch):
    """A model whose logits are not what `_transform` says (here: Gemma 2's soft-capping, forgotten) fails the check
    on its first call and takes the plain path over its full logits: the same loss, a warning once."""
    monkeypatch.setattr(loss_module, "_TRANSFORMS", {k: v for k, v in loss_module._TRANSFORMS.items()
                                                      if k != "final_logit_softcapping"})
    model = _transforming_model("gemma2")
    batch = _batch(model.config.vocab_size)
    with pytest.warns(UserWarning, match="transforms its logits"):
        fast, fast_grads = _value_and_grads(token_loss_sum, model, batch)
    plain, plain_grads = _value_and_grads(_plain, model, batch)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name])
    # remembered: later calls take the plain path at once, one forward each (the check cost a second one)
    forwards = []
    model.model.register_forward_hook(lambda *_: forwards.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, again_grads = _value_and_grads(token_loss_sum, model, batch)
    assert len(forwards) == 1 and again.item() == fast.item()
    for name in plain_grads:
        torch.testing.assert_close(again_grads[name], fast_grads[name], rtol=0, atol=0)


def test_a_checked_model_hands_its_head_no_position(tiny_model_dir):
    """The first call checks the model's logits against the plain projection on one position; later calls run
    the model's own head on none (a [B, 0, H] slice): the same loss and gradients, without its two products."""
    model = _qlora(tiny_model_dir)  # a model of its own: the module's fixture is checked already
    batch, head = _batch(model.config.vocab_size), model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:-1])))
    first, first_grads = _value_and_grads(token_loss_sum, model, batch)
    second, second_grads = _value_and_grads(token_loss_sum, model, batch)
    assert seen == [(2, 1), (2,), (2, 0)]  # the model's head on one position, the check's, then on none
    assert second.item() == first.item() == pytest.approx(_plain(model, batch).item(), rel=1e-5)
    for name in first_grads:
        torch.testing.assert_close(second_grads[name], first_grads[name], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_first_position_check_never_copies_the_head_weight(tiny_model_dir, dtype):
    """The model's own head runs on one position only, as a check (token_losses' hook). A [1, 1, H] slice of the
    [1, T, H] hidden states (a padding-free or packed batch's one row) keeps the stride T*H, which `.contiguous()`
    leaves as it is for a dimension of size 1, and torch's matmul then takes the batched path with the head's
    transposed weight made contiguous in bf16: a copy of the whole vocabulary x hidden weight every forward (70-80
    ms of a 2.4 s bf16 micro batch of SmolLM2 on an AMX Xeon). No op of the loss may copy a tensor the head weight's
    size."""
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["unused.jsonl"]},
        "quantization": {"compute_dtype": dtype}, "lora": {"dropout": 0.0},
        "training": {"gradient_checkpointing": False},
    })
    model = training_model(recipe)
    head = model.get_output_embeddings().weight
    batch = {k: v[:1] for k, v in _batch(model.config.vocab_size).items()}  # one row, as padding-free batches are
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        with torch.profiler.profile(record_shapes=True) as prof:
            token_loss_sum(model, batch)
    copies = [(e.name, e.input_shapes[0]) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous") and e.input_shapes and e.input_shapes[0]
              and torch.Size(e.input_shapes[0]).numel() >= head.numel()]
    assert not copies
