"""The one decoding path (finetune.generate: the lean step over a static KV cache, the Decoder's continuous batching)
against the path it replaced, `model.generate`, on the 2-layer Llama in the compute dtype FINETUNE_CPU_DTYPE picks:
greedy token ids equal for a float base, a 4-bit base with an adapter (dequantized once) and its fold in float32;
rows of different adapters in one batched-LoRA pass answer as each adapter alone; what the lean step does not model
(DoRA) and a compile that fails fall back, named in the log, to the same answers; sampling does not depend on the
batch (scripts/bench_generate.py is run by tests/test_scripts.py).

Batched greedy equality is asserted in float32 only: in bf16 a row's products depend on the batch's size (the bf16
GEMM kernels block by it), so `model.generate` itself answers differently batched and alone there; at batch 1 the
lean step is exact in both dtypes. (On some CPUs a float32 row's last bits depend on the batch's size too, which
greedy ids survive and long sampled sequences need not.)
"""

import dataclasses
import logging

import pytest
import torch
from conftest import load_base
from peft import PeftModel
from test_merge import make_adapter
from test_serve import make_dora
from transformers import AutoTokenizer

import finetune.generate.batch as batch_module
from finetune.errors import RecipeError
from finetune.generate import decode as ev
from finetune.generate import lean, step, weights
from finetune.generate.batch import LeanBatch
from finetune.generate.decode import GenerationOptions
from finetune.generate.decoder import lean_decoder, lean_model
from finetune.model.placement import cpu_has_native_bf16
from finetune.recipe.schema import QuantizationSection

TEXTS = ["Say hi.", "A cat and a dog sat under the tree in the rain", "Name a color", "Repeat the word twice.",
         "The quick brown fox"]
TOKENS = 16


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("path_adapters")
    return [make_adapter(root / "one", tiny_model_dir, seed=0), make_adapter(root / "two", tiny_model_dir, seed=1)]


@pytest.fixture(scope="module")
def float_base(tiny_model_dir):
    return load_base(str(tiny_model_dir), QuantizationSection(load_in_4bit=False)).eval()


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, adapters):
    """The 4-bit base with both adapters, "one" active."""
    net = PeftModel.from_pretrained(load_base(str(tiny_model_dir), QuantizationSection()), str(adapters[0]),
                                    adapter_name="one")
    net.load_adapter(str(adapters[1]), adapter_name="two")
    net.set_adapter("one")
    return net.eval()


def old_path(model, tok, prompts, batch_size):
    """What `generate_ids` ran before: `model.generate` on left-padded batches."""
    options = GenerationOptions(max_new_tokens=TOKENS, batch_size=batch_size)
    return ev._generate_with_model(model, prompts, options, ev.generation_kwargs(model, tok, options), None, None)


def weighted(layer: lean.Layer) -> list[lean.Linear]:
    """The layer's Linears that hold weights: the stacked groups' (`Layer.fused`) and the other projections'."""
    stacked = {p for names in layer.fused for p in names}
    return [*layer.fused.values(), *(lin for p, lin in layer.proj.items() if p not in stacked)]


def new_path(model, tok, prompts, batch_size):
    assert lean_decoder(model) is not None  # the lean step, not a fallback
    return ev.generate_ids(model, tok, prompts, GenerationOptions(max_new_tokens=TOKENS, batch_size=batch_size))


@pytest.mark.parametrize("which", ["float base", "4-bit base + adapter"])
def test_greedy_ids_equal_model_generate(which, float_base, quantized, tok, prompts):
    model = float_base if which == "float base" else quantized
    alone = [old_path(model, tok, [p], 1)[0] for p in prompts]
    assert [new_path(model, tok, [p], 1)[0] for p in prompts] == alone
    assert len({tuple(a) for a in alone}) == len(alone) and all(len(a) > 3 for a in alone)  # five different answers
    if weights.compute_dtype(model) == torch.float32:
        # 5 prompts through 2 rows: rows leave, the next prompt takes their place; the static cache grows and compacts
        assert new_path(model, tok, prompts, 2) == alone == old_path(model, tok, prompts, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_embedding_is_transformers_own_to_the_bit(dtype):
    """The step rotates q and k as `x * cos` plus `x * _swapped_signed(sin)` added half into half (no copy of x to
    swap its halves): the numbers of transformers' `apply_rotary_pos_emb` (rotate_half: five ops)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, heads, 7, 64, generator=generator).to(dtype) for heads in (9, 3))
    angles = torch.randn(3, 7, 64, generator=generator) * 40
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    cos, turned = cos.unsqueeze(2), step._swapped_signed(sin).unsqueeze(2)  # the step's [rows, t, heads, dim] layout
    got = [step._rotated(x.transpose(1, 2), cos, turned).transpose(1, 2) for x in (q, k)]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_norm_is_transformers_rmsnorm_to_the_bit(dtype):
    """`_rms` (float32 statistics as a sum divided by a 0-d width, eps a 0-d tensor, in place) gives the numbers of
    transformers' LlamaRMSNorm (`pow(2).mean(-1)`, `+ eps`, rsqrt) for one row and many, at scales from 1e-3 to 1e3."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576, generator=generator) + 0.5)
    norm = norm.to(dtype)
    for rows in (1, 5):
        for scale in (1e-3, 1.0, 37.0, 1e3):
            x = (torch.randn(rows, 576, generator=generator) * scale).to(dtype)
            assert torch.equal(step._rms(x, norm.weight.detach(), 1e-5), norm(x).detach()), (rows, scale)


def test_a_4bit_weight_is_dequantized_once_to_what_bitsandbytes_computes_with(quantized):
    module = quantized.base_model.model.model.layers[1].mlp.down_proj.base_layer
    dense = weights.dense_weight(module)
    x = torch.randn(3, module.in_features).to(dense.dtype)
    assert torch.equal(torch.nn.functional.linear(x, dense), module(x))
    assert weights.dense_weight(module) is dense  # kept, not dequantized again


def test_weights_are_packed_for_onednn_with_the_same_answers(quantized, tok, prompts, monkeypatch):
    """float32 weights, and bf16 ones where oneDNN packs bf16 (AVX512_BF16 / AMX CPUs), run in oneDNN's pre-packed
    layout (a 4-bit weight's dense copy replaced, not doubled); the logits equal the plain weights' within the
    dtype's summation order (float32: greedy ids exactly); where oneDNN refuses to pack (bf16 on an AVX2 CPU, a
    torch without it) the plain weights run."""
    def decode(lm, names, chosen=None):
        """Logits of a prefill and 4 steps; each step feeds `chosen`'s next ids (else the greedy ones)."""
        batch = LeanBatch(lm)
        logits = [batch.prefill(prompts, names)]
        for step in range(4):
            ids = logits[-1].argmax(-1) if chosen is None else chosen[step].argmax(-1)
            logits.append(batch.decode(ids.tolist(), names))
        return torch.stack(logits)

    names = ["one", "two", None, "two", "one"]
    dtype = weights.compute_dtype(quantized)
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 0)  # (packed alone; the plain copy beside it: below)
    lm = lean.build_lean(quantized, ["one", "two"])
    down = quantized.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    if not weights.packable(dtype):
        assert dtype == torch.bfloat16 and not cpu_has_native_bf16()  # only an AVX2 CPU refuses bf16
        assert all(p.packed is None for p in lm.layers[1].proj.values()) and lm.head.packed is None
        return
    stacked = lm.layers[1].fused  # (q/k/v and gate/up: one packed product each, `test_stacked_...` below)
    assert set(stacked) == set(lean.SHARED) and all(f.packed is not None and f.weight is None for f in stacked.values())
    assert all(lm.layers[1].proj[p].packed is not None and lm.layers[1].proj[p].weight is None
               for p in ("o_proj", "down_proj"))
    assert lm.head.packed is not None and lm.layers[1].proj["down_proj"].packed is getattr(down, weights.PACKED)
    assert lm.head.packed.dtype == dtype
    assert not hasattr(down, weights.DENSE)  # the packed copy replaced the dense one
    assert lean.build_lean(quantized, ["one"]).layers[1].proj["down_proj"].packed is getattr(down, weights.PACKED)
    packed = decode(lm, names)
    for module in (lean, weights):  # oneDNN refuses (a folded weight is packed by lean, the others by weights)
        monkeypatch.setattr(module, "pack", lambda weight: None)
    monkeypatch.setattr(weights, "PACKED", "_test_unpacked")
    monkeypatch.setattr(weights, "FUSED", "_test_unfused")
    plain_lm = lean.build_lean(quantized, ["one", "two"])
    assert all(p.packed is None and p.weight is not None for p in plain_lm.layers[1].proj.values())
    assert plain_lm.layers[1].fused == {}
    plain = decode(plain_lm, names, chosen=packed)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1  # bf16 logits of magnitude ~10: a few ulps
    torch.testing.assert_close(packed, plain, atol=tolerance, rtol=0)
    if dtype == torch.float32:
        assert torch.equal(packed.argmax(-1), plain.argmax(-1))


def test_stacked_projections_answer_as_each_alone_to_the_bit(quantized, float_base, prompts, monkeypatch):
    """q, k and v (and gate and up) read one input: their packed weights stacked by rows make one product each
    group (a small product's set-up is most of its time), split into each projection's columns: the same numbers
    as each projection's own product, so a mixed batch decodes to the same logits bit for bit. The stacked copy is
    kept on the parameters (one copy for every lean model; memory counted as packed), the projections' own dense
    and packed copies dropped."""
    dtype = weights.compute_dtype(quantized)
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 0)
    lm = lean.build_lean(quantized, ["one", "two"])
    if not weights.packable(dtype):  # (bf16 on an AVX2 CPU: the plain weights, one by one)
        assert all(layer.fused == {} for layer in lm.layers)
        return
    attention = quantized.base_model.model.model.layers[1].self_attn
    bases = [getattr(attention, p).base_layer for p in lean.SHARED[0]]
    qkv = lm.layers[1].fused[lean.SHARED[0]]
    assert all(getattr(b.weight, weights.FUSED) is qkv.packed for b in bases)
    assert not any(hasattr(b.weight, weights.PACKED) or hasattr(b.weight, weights.DENSE) for b in bases)
    assert lean.build_lean(quantized, ["one"]).layers[1].fused[lean.SHARED[0]].packed is qkv.packed
    assert qkv.widths == [lean._out_features(b) for b in bases]
    assert lean.build_lean(float_base).layers[1].fused and weights.pack_bytes(float_base) == 0  # (nothing left)
    x = torch.randn(3, bases[0].in_features).to(dtype)
    alone = [weights.packed_product(x, weights.pack(weights.dense_weight(b, keep=False))) for b in bases]
    assert all(torch.equal(a, b) for a, b in zip(qkv(x).split(qkv.widths, dim=1), alone))

    def decode(lm, names=("one", "two", None)):
        batch = LeanBatch(lm)
        logits = [batch.prefill(prompts[:3], list(names))]
        for _ in range(4):
            logits.append(batch.decode(logits[-1].argmax(-1).tolist(), list(names)))
        return torch.stack(logits)

    stacked = decode(lm)
    monkeypatch.setattr(lean, "_stacked", lambda *args: None)
    apart = lean.build_lean(quantized, ["one", "two"])
    assert apart.layers[1].fused == {} and apart.layers[1].proj["q_proj"].packed is not None
    assert torch.equal(stacked, decode(apart))


def test_one_or_two_rows_take_the_plain_weight_where_this_cpu_streams_it_faster(quantized, tok, prompts,
                                                                                 monkeypatch):
    """Where `plain_rows` measured the plain weight's product faster at one or two rows (an Ice Lake Xeon: MKL's
    float32 product 1.4x oneDNN's packed one there), the plain weight is kept beside the packed one, a 4-bit
    weight's dense copy with it: inputs of up to that many rows take the plain one, more rows the packed one, and a
    sequence decodes to the same greedy ids as with the packed weights alone."""
    dtype = weights.compute_dtype(quantized)
    if not weights.packable(dtype):  # (bf16 on an AVX2 CPU: nothing is packed, so there is nothing to choose)
        assert weights.plain_rows(dtype) == 0
        return
    assert weights.plain_rows(dtype) in (0, 1, 2)  # this CPU's answer (measured once: the same object)
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 2)
    lm = lean.build_lean(quantized, ["one", "two"])
    down = quantized.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    for lin in [*lm.layers[1].proj.values(), lm.head]:
        assert lin.packed is not None and lin.weight is not None and lin.plain_rows == 2
    lin = lm.layers[1].proj["down_proj"]
    assert lin.weight is getattr(down, weights.DENSE) and lin.packed is getattr(down, weights.PACKED)
    doubled = dataclasses.replace(lin, weight=lin.weight * 2)  # tells which weight a call read
    x = torch.randn(3, lin.weight.shape[1]).to(dtype)
    assert torch.equal(doubled(x[:2]), torch.nn.functional.linear(x[:2], lin.weight * 2))
    assert torch.equal(doubled(x), lin(x))  # 3 rows: the packed weight
    folded = lean.build_lean(quantized, [], fold="one").layers[1].proj["q_proj"]
    assert folded.packed is not None and folded.weight is not None and folded.lora is None

    def greedy(lm):
        batch = LeanBatch(lm)
        logits = [batch.prefill(prompts[:1], ["one"])]
        for _ in range(6):
            logits.append(batch.decode(logits[-1].argmax(-1).tolist(), ["one"]))
        return torch.cat(logits)

    both = greedy(lm)
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 0)
    alone = greedy(lean.build_lean(quantized, ["one", "two"]))
    assert not hasattr(down, weights.DENSE)  # packed alone again: the dense copy dropped
    torch.testing.assert_close(both, alone, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=0)
    assert torch.equal(both.argmax(-1), alone.argmax(-1))
    budget = weights.dense_bytes(quantized) + weights.pack_bytes(quantized)  # room to pack, not for both copies
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 2)
    monkeypatch.setattr(lean, "fits_in_memory", lambda nbytes: nbytes <= budget)
    tight = lean.build_lean(quantized, ["one", "two"])
    assert tight.head.packed is not None and tight.head.weight is None and tight.head.plain_rows == 0


def test_int8_decode_weights_run_the_few_row_products_and_the_exact_weights_the_rest(quantized, prompts,
                                                                                      monkeypatch):
    """FINETUNE_DECODE_WEIGHTS=int8: every projection and the head get an int8 copy (per-row scales, kept on the
    parameter: one copy for every lean model), which inputs of up to `int8_rows` rows take, with the plain copy
    beside the packed one dropped; more rows (a prefill) take the exact weights, so a prompt's logits are exactly
    the exact step's, and the decoded ones stay within int8's rounding of them. Where memory does not hold the int8
    copy too, the exact weights alone; a value of the variable other than exact or int8 is refused, naming it."""
    dtype = weights.compute_dtype(quantized)
    if not weights.int8_available():
        pytest.fail("this torch has no torch._weight_int8pack_mm")
    assert weights.int8_rows(dtype) in (0, 1, 2, 4, 8, 16)  # this CPU's answer, measured once
    monkeypatch.setattr(lean, "int8_rows", lambda dtype, bar: 4)
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 2)
    exact = lean.build_lean(quantized, ["one", "two"])
    monkeypatch.setenv(weights.DECODE_WEIGHTS, "int8")
    lm = lean.build_lean(quantized, ["one", "two"])
    down = quantized.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    for lin in [*weighted(lm.layers[1]), lm.head]:
        assert lin.int8 is not None and lin.int8_rows == 4 and lin.plain_rows == 0
        assert lin.int8[0].dtype == torch.int8 and lin.int8[1].dtype == torch.bfloat16
    lin = lm.layers[1].proj["down_proj"]
    assert lin.int8 is getattr(down, weights.INT8) and lean.build_lean(quantized, ["one"]).layers[1].proj[
        "down_proj"].int8 is lin.int8
    dense = weights.dense_weight(quantized.base_model.model.model.layers[1].mlp.down_proj.base_layer, keep=False)
    q, scale = lin.int8
    step = scale.float()[:, None]
    assert ((q.float() * step - dense.float()).abs() <= step / 2 + 1e-7).float().mean() > 0.999  # nearest point
    assert (q.abs().amax(dim=1) >= 126).all()  # each row's largest weight at the grid's end
    x = torch.randn(5, lin.int8[0].shape[1]).to(dtype)
    assert torch.equal(lin(x[:4]), weights.int8_product(x[:4], *lin.int8))
    assert torch.equal(lin(x), dataclasses.replace(lin, int8=None)(x))  # 5 rows: the exact weight

    def run(lm):
        """The keys of the prompt's prefill; the logits of it (one row into the head) and of 6 greedy steps."""
        batch = LeanBatch(lm)
        logits = [batch.prefill(prompts[1:2], ["one"])]
        keys = batch.cache.keys[1][0, :, : len(prompts[1])].clone()
        for _ in range(6):
            logits.append(batch.decode(logits[-1].argmax(-1).tolist(), ["one"]))
        return keys, torch.cat(logits)

    assert len(prompts[1]) > 4
    (fast_keys, fast), (slow_keys, slow) = run(lm), run(exact)
    assert torch.equal(fast_keys, slow_keys)  # the prompt's tokens went through the exact weights
    # int8's rounding: 0.17 (float32) and 0.24 (bf16) at most here, of logits spread 1.6; not the same numbers
    assert not torch.equal(fast, slow) and (fast - slow).abs().max() <= 0.25 * slow.std()
    budget = weights.dense_bytes(quantized) + weights.pack_bytes(quantized) + weights.int8_bytes(quantized) - 1
    monkeypatch.setattr(lean, "fits_in_memory", lambda nbytes: nbytes <= budget)
    tight = lean.build_lean(quantized, ["one", "two"])
    assert tight.head.int8 is None and tight.head.int8_rows == 0  # the exact weights alone
    monkeypatch.setenv(weights.DECODE_WEIGHTS, "int9")
    with pytest.raises(RecipeError, match="FINETUNE_DECODE_WEIGHTS='int9': expected 'exact'"):
        lean.build_lean(quantized, ["one", "two"])


def test_int8_decode_weights_hold_the_one_adapter_and_skip_its_products(quantized, prompts, monkeypatch):
    """With int8 decode weights and one adapter every row decodes with (`build_lean(fold_int8=...)`: the decoder's
    adapter in bf16, where the exact weights keep it beside them), each adapted projection's int8 copy is W + s B A
    quantized, so its few-row products skip the adapter's two small products; the exact weights (a prompt's prefill)
    still take them. The decoded logits stay within int8's rounding of the exact step's with the adapter, far from
    the base's; a row asking for anything but that adapter is refused instead of answered with it."""
    # int8 at up to 4 rows only where it need not beat the exact product (the adapter's products go with the fold)
    monkeypatch.setattr(lean, "int8_rows", lambda dtype, bar: 4 if bar == weights.FOLD_WIN else 0)
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 0)
    exact, base = lean.build_lean(quantized, ["one"]), lean.build_lean(quantized, [])
    monkeypatch.setenv(weights.DECODE_WEIGHTS, "int8")
    assert lean.build_lean(quantized, ["one"]).head.int8 is None  # (no fold: int8 must be 15% faster)
    lm = lean.build_lean(quantized, ["one"], fold_int8="one")
    assert lm.int8_folded == "one" and lm.folded is None and lm.adapters == ["one"]
    module = quantized.base_model.model.model.layers[1].mlp.down_proj
    lin = lm.layers[1].proj["down_proj"]
    assert lin.int8_folds and lin.lora is not None and not lm.head.int8_folds
    dense = weights.dense_weight(module.base_layer, keep=False).float()
    a, b = module.lora_A["one"].weight.float(), module.lora_B["one"].weight.float()
    want = weights.int8_weight(dense + (b @ a) * module.scaling["one"])
    assert torch.equal(lin.int8[0], want[0]) and torch.equal(lin.int8[1], want[1])
    assert not torch.equal(lin.int8[0], weights.int8_weight(dense)[0])  # (the adapter moved the grid points)
    calls = []
    real = step._product
    monkeypatch.setattr(step, "_product", lambda *args: calls.append(len(args[0])) or real(*args))

    def run(lm, tokens=None):
        """The logits of the prompt and of 6 steps (greedy, or fed `tokens`); the adapter products of each part."""
        calls.clear()
        batch = LeanBatch(lm)
        logits = [batch.prefill(prompts[1:2], ["one"])]
        prefill, keys = len(calls), batch.cache.keys[1][0, :, : len(prompts[1])].clone()
        for i in range(6):
            logits.append(batch.decode([tokens[i]] if tokens else logits[-1].argmax(-1).tolist(), ["one"]))
        return torch.cat(logits), prefill, len(calls) - prefill, keys

    assert len(prompts[1]) > 4
    slow, slow_prefill, slow_decode, slow_keys = run(exact)
    tokens = slow.argmax(-1).tolist()
    fast, fast_prefill, fast_decode, fast_keys = run(lm, tokens)
    assert fast_decode == 0 and slow_decode == 6 * 2 * 7 * len(lm.layers)  # one row: no adapter products
    assert fast_prefill == slow_prefill == 2 * 7 * len(lm.layers)  # the prompt's rows: the exact weights + adapter
    assert torch.equal(fast_keys, slow_keys)  # the prompt went through the exact weights and the adapter beside them
    off, unadapted = (fast - slow).abs().max(), (run(base, tokens)[0] - slow).abs().max()
    assert 0 < off <= 0.25 * slow.std() and off < unadapted / 4
    batch = LeanBatch(lm)
    with pytest.raises(ValueError, match="holds adapter 'one' in its int8 weights"):
        batch.prefill(prompts[:1], [None])


def test_nf4_decode_weights_are_the_base_codes_with_the_adapter_beside(quantized, prompts, monkeypatch):
    """With int8 decode weights in bf16, a stacked group whose NF4 codes run faster at one row than its int8 copy
    (forced here) takes one-row products from the base's own 4-bit weights through bitsandbytes' CPU kernel, with the
    adapter the int8 copies hold beside them (A stacked, s B batched for gate/up, block-diagonal for q/k/v's unequal
    widths): each product is W + s B A's within bf16's rounding, no per-projection adapter product runs, the decoded
    logits stay within int8's bound of the exact step's and far from the base's. Where the group is not faster, its
    codes' copy is dropped; in float32, or where bitsandbytes has no CPU kernel (no AVX512_BF16), none is made."""
    from finetune.generate import nf4

    monkeypatch.setattr(lean, "int8_rows", lambda dtype, bar: 4)
    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 0)
    monkeypatch.setattr(nf4, "faster", lambda *args: True)
    monkeypatch.setattr(lean, "_NF4_CHOSEN", {})  # (measured once per process: this test decides it)
    exact, base = lean.build_lean(quantized, ["one"]), lean.build_lean(quantized, [])
    monkeypatch.setenv(weights.DECODE_WEIGHTS, "int8")
    dtype, gate = weights.compute_dtype(quantized), quantized.base_model.model.model.layers[1].mlp.gate_proj
    if dtype != torch.bfloat16 or not nf4.available():
        lm = lean.build_lean(quantized, ["one"], fold_int8="one")
        assert all(lin.nf4 is None for layer in lm.layers for lin in weighted(layer))
        monkeypatch.setattr(nf4, "available", lambda: False)
        assert all(lin.nf4 is None for layer in lean.build_lean(quantized, ["one"], fold_int8="one").layers
                   for lin in weighted(layer))
        return
    lm = lean.build_lean(quantized, ["one"], fold_int8="one")
    layer, module = lm.layers[1], quantized.base_model.model.model.layers[1]
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for names, batched in ((lean.SHARED[0], False), (lean.SHARED[1], True)):
        group = layer.fused[names]
        assert group.nf4 is not None and group.holds_adapter(x) and (group.nf4.b.dim() == 3) == batched
        mods = [getattr(module.self_attn if p.endswith(("q_proj", "k_proj", "v_proj")) else module.mlp, p)
                for p in names]
        dense = torch.cat([weights.dense_weight(m.base_layer, keep=False).float() for m in mods])
        delta = torch.cat([(m.lora_B["one"].weight.float() @ m.lora_A["one"].weight.float()) * m.scaling["one"]
                           for m in mods])
        want = x.float() @ (dense + delta).t()
        got = group(x).float()
        assert (got - want).abs().max() <= 0.02 * want.abs().max()  # bf16's rounding of scales and result
        assert (dataclasses.replace(group.nf4, a=None)(x).float() - want).abs().max() > 4 * (got - want).abs().max()
        assert torch.equal(group(x.expand(2, -1).contiguous())[:1], weights.int8_product(x.expand(2, -1), *group.int8)[
            :1])  # two rows: the int8 copy
    assert getattr(gate.base_layer.weight, nf4.FORMAT).codes is layer.fused[lean.SHARED[1]].nf4.codes  # kept once
    calls = []
    real = step._product
    monkeypatch.setattr(step, "_product", lambda *args: calls.append(1) or real(*args))

    def run(lm, tokens):
        batch = LeanBatch(lm)
        logits = [batch.prefill(prompts[1:2], ["one"])]
        calls.clear()
        for i in range(6):
            logits.append(batch.decode([tokens[i]], ["one"]))
        return torch.cat(logits), len(calls)

    slow, _ = run(exact, list(range(5, 11)))
    tokens = slow.argmax(-1).tolist()
    (slow, _), (fast, decoded) = run(exact, tokens), run(lm, tokens)
    assert decoded == 0  # every adapter inside an int8 copy or beside the NF4 codes, as one group
    off, unadapted = (fast - slow).abs().max(), (run(base, tokens)[0] - slow).abs().max()
    assert 0 < off <= 0.25 * slow.std() and off < unadapted / 4
    # several adapters (serve's mixed rows): the codes alone, each row's adapter added per projection as without NF4
    mixed = lean.build_lean(quantized, ["one", "two"])
    group = mixed.layers[1].fused[lean.SHARED[1]]
    assert group.nf4 is not None and group.nf4.a is None and not group.holds_adapter(x)

    def second(lm, adapter):
        """The logits of one decoded row (the NF4 codes' one row where `lm` has them) after the prompt."""
        batch = LeanBatch(lm)
        batch.prefill(prompts[1:2], [adapter])
        return batch.decode([7], [adapter])

    fast_two = second(mixed, "two")
    monkeypatch.delenv(weights.DECODE_WEIGHTS)
    slow_two, base_two = second(lean.build_lean(quantized, ["one", "two"]), "two"), second(base, None)
    off = (fast_two - slow_two).abs().max()
    assert 0 < off <= 0.25 * slow_two.std() and off < (base_two - slow_two).abs().max() / 4
    monkeypatch.setenv(weights.DECODE_WEIGHTS, "int8")
    assert lean._NF4_CHOSEN  # decided once: a later build asks no new measurement
    monkeypatch.setattr(nf4, "faster", lambda *args: pytest.fail("measured twice"))
    assert lean.build_lean(quantized, ["one"], fold_int8="one").layers[1].fused[lean.SHARED[1]].nf4 is not None
    monkeypatch.setattr(lean, "_NF4_CHOSEN", {})
    monkeypatch.setattr(nf4, "faster", lambda *args: False)
    assert all(lin.nf4 is None for layer in lean.build_lean(quantized, ["one"], fold_int8="one").layers
               for lin in weighted(layer))
    assert not hasattr(gate.base_layer.weight, nf4.FORMAT)  # the codes' copy dropped


def test_the_one_row_pass_is_the_general_loop_to_the_bit(quantized, float_base, prompts, monkeypatch):
    """A row decoding its next token alone takes `step._one_row` (each layer's products chosen once: `Linear.row`,
    `step._row_plan`): the same logits, bit for bit, as the general loop, for every kind of weights and adapters it
    meets: the base alone; adapters beside the exact weights (each row's index: one, two, none); one adapter folded
    (float32); the int8 copies holding the adapter, and the NF4 codes with it beside them where this CPU runs
    bitsandbytes' kernel; a row of a larger cache (a view of its row). Prompts (several positions) take the loop."""
    from finetune.generate import nf4

    monkeypatch.setattr(lean, "plain_rows", lambda dtype: 0)
    taken, real = [], step._one_row
    monkeypatch.setattr(step, "_one_row", lambda *args: taken.append(1) or real(*args))

    def decode(lm, adapter: int, rows: int = 1, start: int = 0, steps: int = 5) -> torch.Tensor:
        shape = (rows, lm.kv_heads, 32, lm.head_dim)
        cache = step.Cache([torch.zeros(shape, dtype=lm.dtype) for _ in lm.layers],
                           [torch.zeros(shape, dtype=lm.dtype) for _ in lm.layers])
        prompt = prompts[1]
        n = len(prompt)
        logits = [step.forward(lm, cache, torch.tensor([prompt]), torch.arange(n)[None], start, n, adapter,
                               torch.tensor([n - 1]))]
        for i in range(steps):
            token = int(logits[-1].argmax())
            logits.append(step.forward(lm, cache, torch.tensor([[token]]), torch.tensor([[n + i]]), start, n + i + 1,
                                       adapter))
        return torch.cat(logits)

    def both(lm, adapter: int, **kwargs) -> None:
        taken.clear()
        lm.rows.clear()
        one_row = decode(lm, adapter, **kwargs)
        stacked = all(set(lean.SHARED) <= set(layer.fused) for layer in lm.layers)  # (not: bf16 on an AVX2 CPU)
        assert len(taken) == (5 if stacked else 0)  # every decoded token, not the prompt
        with monkeypatch.context() as m:
            m.setattr(step, "_row_plan", lambda *args: None)
            assert torch.equal(one_row, decode(lm, adapter, **kwargs))

    both(lean.build_lean(float_base), -1)
    beside = lean.build_lean(quantized, ["one", "two"])
    for adapter in (0, 1, -1):
        both(beside, adapter)
    both(beside, 1, rows=3, start=1)
    both(lean.build_lean(quantized, [], fold="one"), -1)
    monkeypatch.setattr(lean, "int8_rows", lambda dtype, bar: 4)
    monkeypatch.setattr(nf4, "faster", lambda *args: True)
    monkeypatch.setattr(lean, "_NF4_CHOSEN", {})
    monkeypatch.setenv(weights.DECODE_WEIGHTS, "int8")
    held = lean.build_lean(quantized, ["one"], fold_int8="one")
    assert held.head.int8 is not None and held.layers[1].proj["down_proj"].int8_folds
    if weights.compute_dtype(quantized) == torch.bfloat16 and nf4.available():
        assert held.layers[1].fused[lean.SHARED[1]].nf4.a is not None  # gate/up: the codes, the adapter beside
    both(held, 0)
    both(held, 0, rows=2, start=1)


def test_the_speed_probes_leave_the_global_random_stream_alone():
    """`plain_rows` and `int8_rows` measure on random weights once per process, at the first decode (in training: at
    the first eval generation or GRPO rollout, which a resumed run reaches at another step): drawn from the global
    generator they would shift dropout and sampling after them, and a resumed run would differ from the run it
    resumes."""
    state = torch.get_rng_state()
    assert weights.plain_rows.__wrapped__(torch.float32) in (0, 1, 2)  # (the probe itself, not its cached answer)
    assert set(weights.int8_ratios.__wrapped__(torch.float32)) <= {1, 2, 4, 8, 16}
    assert torch.equal(torch.get_rng_state(), state)


def test_a_faster_product_is_taken_up_to_the_first_row_count_it_loses_at():
    ratios = {1: 0.9, 2: 0.8, 4: 1.2, 8: 1.3}  # (the probe stops at the first ratio over every bar)
    assert weights._up_to(ratios, weights.WIN) == 0  # not 15% faster at one row: never, though it is at two
    assert weights._up_to(ratios, weights.FOLD_WIN) == 4  # with the adapter inside: up to 1.25x int8's time
    assert weights._up_to({}, weights.WIN) == 0


def test_the_probes_stream_twice_the_last_cache_in_int8(monkeypatch):
    """Probe weights that fit in the cache make int8 (a quarter of float32's bytes) look faster than it is on a
    model's weights: as many weights as make twice the last-level cache in the smallest format compared (4 MiB each
    in int8, 8 in bf16), 6 to 16."""
    assert weights._last_cache_bytes() >= 2**20  # (this machine's, from sysfs; 32 MiB where unreadable)
    for cache, size, count in ((32 * 2**20, 1, 16), (32 * 2**20, 2, 8), (32 * 2**20, 4, 6), (12 * 2**20, 1, 6),
                               (20 * 2**20, 1, 10), (2**30, 1, 16)):
        monkeypatch.setattr(weights, "_last_cache_bytes", lambda cache=cache: cache)
        assert weights.probe_count.__wrapped__(size) == count


def test_float32_folds_the_adapter_bf16_keeps_it_beside_the_weights(quantized, float_base, tiny_model_dir):
    lm = lean_model(quantized)
    if weights.compute_dtype(quantized) == torch.float32:
        assert lm.folded == "one" and all(p.lora is None for p in lm.layers[0].proj.values())
    else:
        assert lm.folded is None and lm.adapters == ["one"]
    assert lean_model(quantized) is lm  # kept while the adapter's weights do not change
    with torch.no_grad():
        next(p for n, p in quantized.named_parameters() if "lora_B.one" in n).mul_(1.0)
    assert lean_model(quantized) is not lm  # they changed (in place, as an optimizer step changes them)


def test_rows_of_different_adapters_share_one_pass_and_answer_as_each_alone(quantized, tok, prompts):
    """Batched LoRA: every adapter's A stacked, a per-row column mask, the stacked B; the base rows take none."""
    lm = lean.build_lean(quantized, ["one", "two"])
    names = ["one", "two", None, "two", "one"]
    batch = LeanBatch(lm)
    mixed = batch.prefill(prompts, names)
    for _ in range(3):
        mixed = batch.decode(mixed.argmax(-1).tolist(), names)
    tolerance = 1e-4 if lm.dtype == torch.float32 else 0.1  # bf16 logits of magnitude ~10: a few ulps
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        alone = LeanBatch(lm)
        logits = alone.prefill([prompt], [name])
        for _ in range(3):
            logits = alone.decode(logits.argmax(-1).tolist(), [name])
        torch.testing.assert_close(mixed[i], logits[0], atol=tolerance, rtol=0)
    # and PEFT's own mixed-adapter forward agrees on the prefill
    with torch.no_grad():
        ids = torch.tensor([prompts[0]] * 3)
        peft = quantized(ids, adapter_names=["one", "two", "__base__"]).logits[:, -1].float()
    ours = LeanBatch(lm).prefill([prompts[0]] * 3, ["one", "two", None])
    torch.testing.assert_close(ours, peft, atol=tolerance, rtol=0)
    assert not torch.allclose(ours[0], ours[1]) and not torch.allclose(ours[1], ours[2])


def test_what_the_lean_step_does_not_model_falls_back_named_in_the_log(tmp_path, tiny_model_dir, tok, prompts,
                                                                       caplog):
    dora = PeftModel.from_pretrained(load_base(str(tiny_model_dir), QuantizationSection()),
                                     str(make_dora(tmp_path / "dora", tiny_model_dir))).eval()
    assert "DoRA" in lean.why_not_lean(dora)
    with caplog.at_level(logging.WARNING, logger="finetune.generate"):
        got = ev.generate_ids(dora, tok, prompts[:2], GenerationOptions(max_new_tokens=TOKENS, batch_size=1))
    assert got == old_path(dora, tok, prompts[:2], 1)
    assert any("does not model adapter default: a LoRA variant" in r.message for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("decode_weights", ["exact", "int8"])
def test_the_compiled_step_compiles_and_answers_as_the_eager_one(decode_weights, float_base, prompts, monkeypatch,
                                                                 caplog, tmp_path):
    """FINETUNE_DECODE_COMPILE=1 compiles the step (packed float32 weights, int8 ones) instead of falling back: inductor
    failed on the packed weights until their product became an op of its own (`weights.packed_product`)."""
    monkeypatch.setenv("FINETUNE_DECODE_COMPILE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(weights.DECODE_WEIGHTS, decode_weights)
    monkeypatch.setattr(lean, "int8_rows", lambda dtype, bar: 4)
    monkeypatch.setattr(batch_module, "_compiled", {})
    lm = lean.build_lean(float_base)
    assert (lm.head.int8 is not None) == (decode_weights == "int8")

    def greedy(step):
        batch = LeanBatch(lm, step)
        logits = [batch.prefill(prompts[:2], [None, None])]
        for _ in range(3):
            logits.append(batch.decode(logits[-1].argmax(-1).tolist(), [None, None]))
        return torch.stack(logits)

    with caplog.at_level(logging.WARNING, logger="finetune.generate"):
        compiled = greedy(batch_module.decode_step())
    assert "decoding without torch.compile" not in caplog.text and not batch_module._compiled.get("failed")
    eager = greedy(step.forward)
    dtype = weights.compute_dtype(float_base)
    if dtype == torch.float32:
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
        assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    else:  # inductor rounds once per fused kernel where eager rounds every op: bf16 noise through the network
        # (2-layer model, logits' std 1.6: mean difference 0.017-0.018, largest 0.08-0.11 on an AVX512_BF16 EPYC)
        diff = (compiled - eager).abs()
        assert diff.mean() <= 0.02 * eager.std() and diff.max() <= 0.1 * eager.std()  # (same tokens fed)


def test_a_compile_that_fails_falls_back_to_the_eager_step(float_base, tok, prompts, monkeypatch, caplog):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setenv(batch_module.COMPILE, "1")
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(batch_module, "_compiled", {})
    with caplog.at_level(logging.WARNING, logger="finetune.generate"):
        got = new_path(float_base, tok, prompts[:2], 2)
    assert got == [old_path(float_base, tok, [p], 1)[0] for p in prompts[:2]]
    assert any("decoding without torch.compile" in r.message and "no C++ compiler here" in r.message
               for r in caplog.records)


def test_sampling_is_seeded_per_prompt_not_per_batch(float_base, tok, prompts):
    hot = GenerationOptions(max_new_tokens=TOKENS, temperature=1.5, top_p=0.9, seed=3)
    one = ev.generate_ids(float_base, tok, prompts, GenerationOptions(**{**vars(hot), "batch_size": 1}))
    four = ev.generate_ids(float_base, tok, prompts, GenerationOptions(**{**vars(hot), "batch_size": 4}))
    assert four == ev.generate_ids(float_base, tok, prompts, GenerationOptions(**{**vars(hot), "batch_size": 4}))
    assert len({tuple(x) for x in one}) == len(one)  # really sampling
    if weights.compute_dtype(float_base) == torch.float32:  # (bf16 logits depend on the batch's size: see the top)
        # the same draws: the same first tokens (a batch's own random stream would part them at once); later ones
        # may part where the products' last bits depend on the batch's size, as on an Ice Lake Xeon (oneDNN's float32
        # kernel blocks by it, and a row decoding alone takes MKL's product on the plain weight: `plain_rows`)
        assert [x[:4] for x in one] == [x[:4] for x in four]
    other = ev.generate_ids(float_base, tok, prompts, GenerationOptions(**{**vars(hot), "seed": 4}))
    assert other != one



def test_equal_prompts_share_one_prefill_and_sample_as_alone(float_base, tok, prompts, monkeypatch):
    """GRPO asks for G answers to each prompt: consecutive equal prompts are prefilled once and the cache row
    copied; each answer still draws from its own generator, so it is what that prompt alone gives."""
    asked = [p for p in prompts[:3] for _ in range(4)]
    hot = GenerationOptions(max_new_tokens=TOKENS, temperature=1.2, seed=5)
    alone = ev.generate_ids(float_base, tok, asked, GenerationOptions(**{**vars(hot), "batch_size": 1}))
    prefilled = []
    real = LeanBatch.prefill
    monkeypatch.setattr(LeanBatch, "prefill", lambda self, ps, names: prefilled.append(len(ps)) or real(self, ps, names))
    grouped = ev.generate_ids(float_base, tok, asked, GenerationOptions(**{**vars(hot), "batch_size": 6}))
    # 3 prompts in 6 rows: 4 + 2, then the second one's other 2 + 4 (more if an answer ends early); 12 unshared
    assert 4 <= sum(prefilled) <= 6
    assert len({tuple(x) for x in grouped}) > 3  # the four answers to a prompt differ
    if weights.compute_dtype(float_base) == torch.float32:  # (bf16 logits depend on the batch's size: see the top)
        assert grouped == alone


@pytest.mark.parametrize("spread", ["peaked", "flat"])
def test_a_top_p_draw_keeps_exactly_the_nucleus_with_its_probabilities(spread):
    """The nucleus is sorted among the most likely NUCLEUS_CANDIDATES tokens, the whole vocabulary only when it
    reaches past them ("flat"); either way the draw keeps the tokens a full sort keeps, in proportion."""
    from finetune.generate.decoder import NUCLEUS_CANDIDATES, Sequence, sample

    torch.manual_seed(0)
    logits = torch.randn(1000) * (2.0 if spread == "peaked" else 0.05)  # a 7-token nucleus, or 887
    probs, order = torch.softmax(logits / 0.7, -1).sort(descending=True)
    keep = (probs.cumsum(0) - probs) <= 0.9
    nucleus = dict(zip(order[keep].tolist(), (probs[keep] / probs[keep].sum()).tolist()))
    assert (len(nucleus) > NUCLEUS_CANDIDATES) == (spread == "flat")
    s = Sequence([1], 1, frozenset(), temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(1))
    draws = torch.tensor([sample(logits, s) for _ in range(4000)])
    assert set(draws.tolist()) <= set(nucleus)
    if spread == "peaked":  # few tokens: each one's frequency within 4 standard errors of its probability
        for token, p in nucleus.items():
            assert abs((draws == token).float().mean().item() - p) <= 4 * (p * (1 - p) / 4000) ** 0.5 + 1e-3
    else:  # hundreds of near-equal tokens: most of them drawn
        assert len(set(draws.tolist())) > 0.8 * len(nucleus)


def test_bf16_lora_products_in_float32_are_the_bf16_products():
    """bf16 adapters' A and B run as float32 products of the same bf16 values, rounded to bf16 once: what a bf16
    product computes (float32 sums, one rounding), so equal to it but for the order of the sums."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 576, generator=g).bfloat16()
    for shape in [(16, 576), (576, 16)]:
        w = (torch.randn(*shape, generator=g) * 0.05).bfloat16()
        xs = x if shape[1] == 576 else x[:, :16]
        got = step._product(xs, w.float(), torch.bfloat16)
        want = torch.nn.functional.linear(xs, w)
        assert got.dtype == torch.bfloat16
        assert (got == want).float().mean() > 0.98  # a differently ordered sum moves a rare value by one ulp
        torch.testing.assert_close(got, want, atol=0, rtol=2**-7)
