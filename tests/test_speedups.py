"""The CPU training speedups compute what they replace: the fused LoRA forward (finetune/model/fused.py) against
peft's own, loss and LoRA gradients within the dtype's rounding, on the 4-bit tiny model in float32 and bf16."""

import pytest
import torch

from finetune.model.fused import fused_forward
from finetune.objectives.loss import token_loss_sum
from finetune.recipe.schema import Recipe
from conftest import training_model

# bf16 keeps 8 significant bits: one rounding is 2^-8 relative; a loss or gradient is a few dozen of them deep,
# so the two orders of the same sums agree to a few 2^-8 (measured: loss 1e-3, gradients 2e-2 of their norm)
TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (8 * 2**-8, 16 * 2**-8)}  # (loss, gradient) relative


def _model(model_dir, dtype: str, dropout: float = 0.1, **lora):
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"]},
        "quantization": {"compute_dtype": dtype}, "lora": {"dropout": dropout, **lora},
        "training": {"gradient_checkpointing": False},
    })
    model = training_model(recipe)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters' output matter
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (2, 40), generator=g)
    labels = ids.clone()
    labels[:, :15] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_and_grads(model, batch, dtype: str, seed: int = 5):
    torch.manual_seed(seed)  # the same dropout masks in both forwards
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):  # as accelerate does
        loss = token_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _peft_forward(model):
    """The same model with peft's own LoRA forward back."""
    for m in model.modules():
        if getattr(m, "forward", None) is not None and getattr(m.forward, "__func__", None) is fused_forward:
            del m.forward


# bf16 without dropout: under CPU autocast peft casts each adapter's input to float32 first, a new tensor per
# adapter, so its q, k and v would draw three masks where the fused forward draws one
@pytest.mark.parametrize("dtype,dropout", [("float32", 0.1), ("bfloat16", 0.0)])
def test_fused_lora_forward_matches_peft(tiny_model_dir, dtype, dropout):
    model = _model(tiny_model_dir, dtype, dropout)
    fused = [m for m in model.modules() if getattr(getattr(m, "forward", None), "__func__", None) is fused_forward]
    assert len(fused) == 2 * 7  # every adapted linear layer of the 2-layer model
    batch = _batch()
    loss, grads = _loss_and_grads(model, batch, dtype)
    _peft_forward(model)
    ref_loss, ref_grads = _loss_and_grads(model, batch, dtype)
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert loss == pytest.approx(ref_loss, rel=loss_tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        ref = ref_grads[name]
        assert (g - ref).norm() <= grad_tol * ref.norm(), name


def test_fused_forward_leaves_the_other_cases_to_peft(tiny_model_dir):
    """DoRA, QA-LoRA, an adapter switched off, a bf16 input outside autocast, and eval mode (every inference path,
    so that they round alike in bf16) take peft's forward, unchanged."""
    x = torch.randn(2, 5, 64)
    for lora in ({"use_dora": True}, {"use_qalora": True, "qalora_group_size": 16}):
        variant = _model(tiny_model_dir, "float32", dropout=0.0, **lora)
        layer = variant.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.forward.__func__ is fused_forward and layer.lora_variant  # installed, and steps aside
        assert torch.equal(layer(x), type(layer).forward(layer, x))
    plain = _model(tiny_model_dir, "bfloat16", dropout=0.0)
    layer = plain.base_model.model.model.layers[0].mlp.down_proj
    h = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    assert torch.equal(layer(h), type(layer).forward(layer, h))  # peft casts to the adapter's float32 and back
    with plain.disable_adapter():
        assert torch.equal(layer(h), layer.base_layer(h))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = layer(h)
        assert not torch.equal(trained, type(layer).forward(layer, h))  # in training: one addmm, its own rounding
        plain.eval()
        assert torch.equal(layer(h), type(layer).forward(layer, h))


def _logits(model, batch, dtype: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    model.train()
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_norms_match_the_eager_ones(tiny_model_dir, dtype, monkeypatch):
    """finetune/model/compile.py: logits, loss and LoRA gradients of the eager model, within the dtype's rounding;
    compiling and probing leave the global generator (dropout's masks, exact resume) where it was."""
    from finetune.model import compile as compiled

    model = _model(tiny_model_dir, dtype, dropout=0.05)
    batch = _batch()
    ref_logits, (ref_loss, ref_grads) = _logits(model, batch, dtype), _loss_and_grads(model, batch, dtype)
    monkeypatch.setattr(compiled, "_compiled", None)  # compile and probe here (inductor's disk cache: quick)
    state = torch.get_rng_state()
    assert compiled.use_compiled_norms(model) == "compiled (5 RMSNorm, torch.compile inductor)"  # 2 a layer + final
    assert torch.equal(torch.get_rng_state(), state)
    logits, (loss, grads) = _logits(model, batch, dtype), _loss_and_grads(model, batch, dtype)
    # ... through the compiled norms, after eval() and train(): transformers' hub kernels, on by default, used to
    # put every norm's own forward back at each mode switch (the training loop's model.train() among them)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 5 and all(isinstance(vars(m).get("forward"), compiled._Forward) for m in norms)
    with torch.profiler.profile() as prof:  # (after the calls above: a compile traces aten ops the profiler sees)
        _loss_and_grads(model, batch, dtype)
    assert not [e.name for e in prof.events() if e.name in ("aten::pow", "PowBackward0")]  # eager norm ops
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert (logits - ref_logits).norm() <= grad_tol * ref_logits.norm()
    assert loss == pytest.approx(ref_loss, rel=loss_tol)
    for name, g in grads.items():
        assert (g - ref_grads[name]).norm() <= grad_tol * ref_grads[name].norm(), name


def _eager_norm_ops(norm, x) -> list[str]:
    """The eager norm's ops in a call of `norm` on `x` (and its backward), after a first call that may compile."""
    def call():
        out = norm(x)
        out.float().sum().backward() if x.requires_grad else None

    call()  # (a compilation traces aten ops the profiler would see)
    with torch.profiler.profile() as prof:
        call()
    return [e.name for e in prof.events() if e.name in ("aten::pow", "PowBackward0")]


def test_each_model_compiles_its_norms_whatever_ran_before_in_the_process(tiny_model_dir):
    """Dynamo runs a compiled function eagerly once 8 variants of it exist (dtype, rank, grad mode, ...). One compiled
    norm per process let earlier runs in it use that budget up, so a later run's norms ran eagerly: in bf16 its
    losses then differed from a fresh process's (test_trust compares a run in a child process with one in the test
    worker, and failed so after other test files had trained in that worker). Each model compiles its own."""
    from finetune.model import compile as compiled

    first, second = _model(tiny_model_dir, "float32"), _model(tiny_model_dir, "float32")
    assert compiled.use_compiled_norms(first).startswith("compiled")
    norm = first.base_model.model.model.norm
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # 12 variants, none of them 3-D with a gradient
        for shape, grad in (((5, 64), False), ((5, 64), True), ((1, 2, 5, 64), False), ((1, 2, 5, 64), True)):
            _eager_norm_ops(norm, torch.randn(shape, dtype=dtype, requires_grad=grad))
    assert _eager_norm_ops(norm, torch.randn(2, 5, 64, requires_grad=True))  # the first model's budget is spent
    assert compiled.use_compiled_norms(second).startswith("compiled")
    assert not _eager_norm_ops(second.base_model.model.model.norm, torch.randn(2, 5, 64, requires_grad=True))


def test_compiled_norms_fall_back_to_eager_and_say_why(tiny_model_dir, monkeypatch):
    from finetune.model import compile as compiled

    model = _model(tiny_model_dir, "float32")
    monkeypatch.setattr(compiled, "_compiled", None)
    monkeypatch.setenv("FINETUNE_COMPILE", "0")
    assert compiled.use_compiled_norms(model) == "eager: FINETUNE_COMPILE=0"
    monkeypatch.setattr(compiled, "_compiled", None)
    monkeypatch.delenv("FINETUNE_COMPILE")

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler\nmore")

    monkeypatch.setattr(torch, "compile", broken)
    assert compiled.use_compiled_norms(model) == "eager: torch.compile failed (RuntimeError: no C++ compiler)"
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" not in vars(m) for m in norms)  # the modules' own forward, untouched


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_forward_adds_the_adapter_into_the_base_output_without_copying_it(tiny_model_dir, dtype):
    """finetune/model/fused.py: the adapter's product goes into the base output's own storage (addmm_): an
    out-of-place addmm copies the [tokens, out] base output first, a pass per layer (a view of it would be copied
    in backward instead). Forward and backward of one layer copy no tensor of the output's size."""
    model = _model(tiny_model_dir, dtype, dropout=0.1)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    h = torch.randn(2, 5, 128, dtype=getattr(torch, dtype), requires_grad=True)  # hidden states: the compute dtype
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        with torch.profiler.profile(record_shapes=True) as prof:
            out = layer(h)
            out.backward(torch.randn_like(out))  # a dense gradient (a sum's would be expanded, copied by mm)
    assert out.shape == (2, 5, 64)
    copies = [(e.name, e.input_shapes[0]) for e in prof.events() if e.name in ("aten::copy_", "aten::clone")
              and e.input_shapes and torch.Size(e.input_shapes[0]).numel() == out.numel()
              and len(e.input_shapes[0]) > 0]
    assert not copies
