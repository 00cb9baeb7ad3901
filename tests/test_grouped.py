"""Sibling LoRA layers as one autograd node (finetune/model/grouped.py): the same losses and gradients as each
layer computed alone within the dtype's rounding, the cached weights read in place, no output kept past its layer,
and every case it cannot compute left to the layer alone."""

import pytest
import torch

from finetune.model import cache_weights
from finetune.model.grouped import _Grouped, ungroup

from test_training import one_thread  # noqa: F401  (autouse: one thread for tiny matmuls)
from test_weight_cache import loss_and_grads, nf4_model

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # relative: float32 rounding; bf16's 8 bits through 2 layers


def batch(model):
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def cached_model(tmp_path, model_dir, dtype: str, **lora):
    model = nf4_model(tmp_path, model_dir, dtype, **lora)
    cache_weights(model, getattr(torch, dtype))
    return model


def groups(model) -> list:
    return list({id(g): g for m in model.modules() if (g := m.__dict__.get("lora_group")) is not None}.values())


@pytest.mark.parametrize("dtype,dropout", [("float32", 0.1), ("float32", 0.0), ("bfloat16", 0.05)])
def test_the_grouped_siblings_give_what_each_layer_gives_alone(tmp_path, tiny_model_dir, dtype, dropout,
                                                              monkeypatch):
    model = cached_model(tmp_path, tiny_model_dir, dtype, dropout=dropout)
    found = groups(model)
    assert sorted(len(g.members) for g in found) == [2, 2, 3, 3]  # q/k/v and gate/up in each of 2 layers
    calls = []
    apply = _Grouped.apply
    monkeypatch.setattr(_Grouped, "apply", lambda *a: calls.append(1) or apply(*a))
    loss, grads = loss_and_grads(model, batch(model), dtype)  # the same draws of the dropout (one seed) both ways
    assert len(calls) == 4  # every group computed once, its members' later calls answered from it
    ungroup(model)
    alone_loss, alone = loss_and_grads(model, batch(model), dtype)
    assert len(calls) == 4 and grads.keys() == alone.keys() and len(grads) == 28
    tol = TOLERANCE[dtype]
    assert loss.item() == pytest.approx(alone_loss.item(), rel=tol)
    for name, g in grads.items():
        assert ((g - alone[name]).norm() / alone[name].norm()).item() < tol, name


def test_the_group_reads_the_cached_weights_and_keeps_no_copy(tmp_path, tiny_model_dir):
    """The products read each member's cached weight (a change to k's changes the loss) and the group adds no
    weight memory of its own."""
    model = cached_model(tmp_path, tiny_model_dir, "float32")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    before = {m.cached_weight.untyped_storage().data_ptr() for m in layers}
    first, _ = loss_and_grads(model, batch(model), "float32")
    assert {m.cached_weight.untyped_storage().data_ptr() for m in layers} == before and len(before) == 14
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.k_proj.base_layer.cached_weight.mul_(1.5)
    assert loss_and_grads(model, batch(model), "float32")[0].item() != pytest.approx(first.item(), rel=1e-6)


def test_a_member_fed_another_input_gets_its_own_output(tmp_path, tiny_model_dir):
    """A sibling called on another tensor than the group's last input is computed for that tensor."""
    model = cached_model(tmp_path, tiny_model_dir, "float32", dropout=0.0)
    attention = model.base_model.model.model.layers[0].self_attn
    x, y = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    q = attention.q_proj(x)
    k_of_y = attention.k_proj(y)
    ungroup(model)
    torch.testing.assert_close(q, attention.q_proj(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_of_y, attention.k_proj(y), rtol=1e-5, atol=1e-6)


def test_what_the_group_cannot_compute_is_computed_alone(tmp_path, tiny_model_dir, monkeypatch):
    """Eval mode, disabled adapters and a base without the cache take each layer's own forward."""
    model = cached_model(tmp_path, tiny_model_dir, "float32")
    calls = []
    monkeypatch.setattr(_Grouped, "apply", lambda *a: calls.append(1))
    with torch.no_grad():
        model.eval()
        model(**batch(model))
        model.train()
        with model.disable_adapter():
            model(**batch(model))
        cache_weights(model, None)
        model(**batch(model))
    assert calls == []


def test_members_with_their_own_dropout_stay_alone(tmp_path, tiny_model_dir, monkeypatch):
    """A run begun before masks were shared draws one mask per adapter: k and v must not take q's."""
    from finetune.model.dropout import use_cpu_dropout

    model = cached_model(tmp_path, tiny_model_dir, "float32", dropout=0.1)
    for module in model.modules():  # back to torch's dropout, then one instance per adapter as such a run has
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    use_cpu_dropout(model, "per adapter")
    calls = []
    monkeypatch.setattr(_Grouped, "apply", lambda *a: calls.append(1))
    loss_and_grads(model, batch(model), "float32")
    assert calls == []


def test_the_group_keeps_no_output_past_the_layer(tmp_path, tiny_model_dir):
    """Each member's output is handed out once; the group holds none of them afterwards (activation memory)."""
    model = cached_model(tmp_path, tiny_model_dir, "float32", dropout=0.0)
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(1, 5, 64)
    outs = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    group = attention.q_proj.lora_group
    assert group._last[1] == [None, None, None] and all(o.shape[:2] == (1, 5) for o in outs)
    again = attention.k_proj(x)  # a second call on the same input: computed anew
    torch.testing.assert_close(again, outs[1])
