"""`finetune export` on 2-layer Llama and Qwen2 models: transformers reads the GGUF back with the same tokenizer
ids and logits; q8_0 keeps the top-1 token; bad inputs are exit-2 errors."""

import json
import shutil

import pytest
import torch
from conftest import CHATML_TEMPLATE, CORPUS
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from finetune.cli import app

pytest.importorskip("gguf")
runner = CliRunner()
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
STRINGS = ["Hello world", "<|im_start|>user\nhi there<|im_end|>\n", "naïve café, 東京 🙂 Ünïcödé",
           "12345 + 678", "  spaces\tand\ttabs\n\n", '{"name": "Ada", "age": 36}']
PROBE = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11, 200, 301], [4, 8, 15, 16, 23, 42, 99, 2, 150, 17]])


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    return _tiny_qwen(tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory):
    return _tiny_qwen(tmp_path_factory, "qwen3")


def _tiny_qwen(tmp_path_factory, kind):
    """A random 2-layer Qwen2 (q/k/v biases) or Qwen3 (q/k norms), tied embeddings, GQA, with a Qwen2-style
    byte-level BPE tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                                  clean_up_tokenization_spaces=False)
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_class(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id, initializer_range=0.2,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # random biases and norms, so a wrong mapping shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    path = tmp_path_factory.mktemp(f"tiny_{kind}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def export_and_reload(model_dir, out, type_):
    result = runner.invoke(app, ["export", str(model_dir), "--out", str(out), "--type", type_])
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    report = json.loads((out.parent / "export_report.json").read_text())
    return reloaded, report, result.output


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


@pytest.mark.parametrize("which", ["llama", "qwen2", "qwen3"])
def test_f32_export_reloads_with_the_same_tokenizer_and_logits(which, request, tmp_path):
    model_dir = request.getfixturevalue("tiny_model_dir" if which == "llama" else f"tiny_{which}_dir")
    out = tmp_path / "model-f32.gguf"
    reloaded, report, output = export_and_reload(model_dir, out, "f32")
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert (logits(reloaded) - logits(source)).abs().max().item() <= 1e-4
    assert report["architecture"] == which and report["type"] == "f32"
    assert report["fidelity"]["max_abs_logit_diff"] <= 1e-4 and report["fidelity"]["top1_agreement"] == 1.0
    assert report["tokenizer"]["pre"] == ("gpt-2" if which == "llama" else "qwen2")  # qwen3 uses qwen2's
    assert all(report["tokenizer_agreement"].values())
    tok = AutoTokenizer.from_pretrained(model_dir)
    gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for s in STRINGS:
        assert gguf_tok(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"], s
    assert gguf_tok.chat_template == tok.chat_template
    assert gguf_tok.eos_token == tok.eos_token
    assert f"tokenizer gpt2 (pre-tokenizer {report['tokenizer']['pre']})" in output


def test_q8_0_keeps_the_top1_token(tiny_model_dir, tmp_path):
    """On a random 2-layer model many tokens are near-ties (median top-2 margin ~0.36) that 8-bit rounding may
    flip; the decisive ones (margin > 0.5) must all keep their top-1. The real model is checked in the slow test."""
    out = tmp_path / "model-q8_0.gguf"
    reloaded, report, _ = export_and_reload(tiny_model_dir, out, "q8_0")
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 500, (8, 64))
    with torch.no_grad():
        a, b = reloaded(input_ids=ids).logits, source(input_ids=ids).logits
    same = a.argmax(-1) == b.argmax(-1)
    top2 = b.topk(2, -1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 0.5
    assert decisive.sum() > 100 and same[decisive].float().mean().item() >= 0.99
    assert same.float().mean().item() >= 0.9
    assert 0 < (a - b).abs().max().item() < 1.0  # quantized, so not identical, but close
    assert report["fidelity"]["top1_agreement"] >= 0.9 and report["type"] == "q8_0"
    f32 = tmp_path / "f32" / "model.gguf"
    f32.parent.mkdir()
    runner.invoke(app, ["export", str(tiny_model_dir), "--out", str(f32), "--type", "f32"])
    assert out.stat().st_size < 0.4 * f32.stat().st_size  # ~8.5 bits per weight instead of 32


def test_adapter_checkpoint_is_merged_first(tiny_model_dir, tmp_path):
    from test_merge import make_adapter

    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir)
    out = tmp_path / "tuned.gguf"
    reloaded, report, _ = export_and_reload(adapter, out, "f32")
    assert report["merged_from"] == str(adapter) and report["base_weights"] == "dequantized"
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(merged), "--dtype", "fp32"]).exit_code == 0
    source = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert (logits(reloaded) - logits(source)).abs().max().item() <= 1e-4


def test_unsupported_architecture_and_existing_output_are_exit_2(tiny_model_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["export", str(odd), "--out", str(tmp_path / "odd.gguf")])
    assert result.exit_code == 2
    assert "FalconForCausalLM" in result.output and "Qwen2ForCausalLM" in result.output
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))

    taken = tmp_path / "taken.gguf"
    taken.write_text("mine")
    result = runner.invoke(app, ["export", str(tiny_model_dir), "--out", str(taken)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert taken.read_text() == "mine"


def test_adapter_only_plus_base_gguf_equals_the_merged_gguf(tiny_model_dir, tmp_path):
    """What llama.cpp computes at load, W + (alpha / r) * B @ A from the adapter file over the base file, equals
    the merged export tensor by tensor (q/k permuted alike)."""
    import gguf

    from finetune.export.gguf import write_gguf
    from test_merge import make_adapter

    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir, load_in_4bit=False)
    write_gguf(tiny_model_dir, tmp_path / "base.gguf", "f32")
    (tmp_path / "m").mkdir()
    assert runner.invoke(app, ["export", str(adapter), "--out", str(tmp_path / "m" / "merged.gguf"),
                               "--type", "f32"]).exit_code == 0
    result = runner.invoke(app, ["export", str(adapter), "--adapter-only", "--out", str(tmp_path / "lora.gguf"),
                                 "--type", "f32"])
    assert result.exit_code == 0, result.output
    lora = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert lora.fields["general.type"].contents() == "adapter" and lora.fields["adapter.type"].contents() == "lora"
    alpha = lora.fields["adapter.lora.alpha"].contents()
    pairs = {t.name: t.data for t in lora.tensors}
    base = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "base.gguf").tensors}
    merged = {t.name: t.data for t in gguf.GGUFReader(tmp_path / "m" / "merged.gguf").tensors}
    targets = [n.removesuffix(".lora_a") for n in pairs if n.endswith(".lora_a")]
    assert len(targets) == 2 * 7 and "blk.1.attn_q.weight" in targets  # all-linear on 2 layers
    for name in targets:
        a, b = torch.tensor(pairs[name + ".lora_a"]), torch.tensor(pairs[name + ".lora_b"])
        delta = alpha / a.shape[0] * (b @ a)
        assert torch.allclose(torch.tensor(base[name]) + delta, torch.tensor(merged[name]), atol=1e-5), name
    untouched = set(merged) - set(targets)
    assert all(torch.equal(torch.tensor(base[n]), torch.tensor(merged[n])) for n in untouched)
