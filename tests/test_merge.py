"""`finetune merge` on a 2-layer model: fidelity of both base-weight choices, sharding, atomicity, weighted adapters.

The adapters here are not trained: PEFT's `init_lora_weights=False` gives random, non-zero A and B, which
exercises the merge arithmetic just as well and takes a fraction of a second.
"""

import json

import bitsandbytes as bnb
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import finetune.merge.model as merge_module
from finetune.merge import probe_batch
from finetune.cli import app
from finetune.errors import CheckpointError
from finetune.merge.model import merge
from finetune.recipe.schema import QuantizationSection
from conftest import load_base

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11], [4, 8, 15, 16, 23, 42, 99, 2]])


def make_adapter(path, model_dir, *, r=8, seed=0, load_in_4bit=True):
    """A saved adapter with random LoRA weights, laid out like a checkpoint (tokenizer, recipe.yaml)."""
    quant = QuantizationSection(load_in_4bit=load_in_4bit)
    torch.manual_seed(seed)
    base = load_base(str(model_dir), quant, "cpu")
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():  # keep the delta modest, like a trained adapter's
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    recipe = {"model": {"name_or_path": str(model_dir)}, "quantization": quant.model_dump()}
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return make_adapter(tmp_path_factory.mktemp("adapter"), tiny_model_dir)


@pytest.fixture(scope="module")
def adapter_b(tmp_path_factory, tiny_model_dir):
    return make_adapter(tmp_path_factory.mktemp("adapter_b"), tiny_model_dir, seed=1)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def reference(model_dir, adapter_dir, quantized: bool):
    # float32, as merge computes its reference (a bf16 CPU would otherwise compare bf16 rounding)
    base = load_base(str(model_dir), QuantizationSection(compute_dtype="float32"), "cpu") if quantized \
        else AutoModelForCausalLM.from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def merged(tmp_path_factory, adapter):
    """The default merge of a 4-bit adapter, through the CLI."""
    out = tmp_path_factory.mktemp("merged") / "model"
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_default_merge_reproduces_the_trained_quantized_model(merged, adapter, tiny_model_dir):
    out, output = merged
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trained = reference(tiny_model_dir, adapter, quantized=True)
    torch.testing.assert_close(logits(model), logits(trained), atol=1e-4, rtol=1e-4)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base_weights"] == "dequantized" and report["dtype"] == "float32"
    assert report["fidelity"]["dequantized"]["max_abs_logit_diff"] < 1e-4
    assert report["fidelity"]["dequantized"]["top1_agreement"] == 1.0
    assert "merge fidelity" in output and "dequantized" in output and "original" in output


def test_report_says_how_far_the_original_weights_merge_is(merged, adapter, tiny_model_dir):
    """The 'original' figure in the report is the real distance of W + delta from the trained model."""
    out, _ = merged
    report = json.loads((out / "merge_report.json").read_text())["fidelity"]["original"]
    probe = probe_batch(AutoTokenizer.from_pretrained(adapter))
    keep = probe["attention_mask"].bool()
    full, trained = reference(tiny_model_dir, adapter, False), reference(tiny_model_dir, adapter, True)
    with torch.no_grad():
        d = (full(**probe).logits - trained(**probe).logits).abs()[keep]
    assert report["max_abs_logit_diff"] == pytest.approx(d.max().item(), rel=1e-3)
    assert report["mean_abs_logit_diff"] == pytest.approx(d.mean().item(), rel=1e-3)
    assert report["max_abs_logit_diff"] > 100 * 1e-4  # NF4 rounding is far above float noise


def test_original_merge_matches_full_precision_base_plus_adapter(adapter, tiny_model_dir, tmp_path):
    rep = merge(adapter, tmp_path / "orig", base_weights="original")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "orig")
    torch.testing.assert_close(logits(model), logits(reference(tiny_model_dir, adapter, False)), atol=1e-4, rtol=1e-4)
    assert rep.base_weights == "original" and set(rep.fidelity) == {"original", "dequantized"}
    assert rep.fidelity["dequantized"]["max_abs_logit_diff"] < 1e-4 < rep.fidelity["original"]["max_abs_logit_diff"]


def test_output_is_a_complete_standalone_model(merged, tiny_model_dir):
    out, _ = merged
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "merge_report.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert not list(out.parent.glob(".tmp-*")) and not list(out.parent.glob(".scratch-*"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_shards_over_the_size_limit_and_plain_transformers_loads_them(merged, adapter, tmp_path):
    out = tmp_path / "sharded"
    rep = merge(adapter, out, max_shard_size="100KB")
    whole_report = json.loads((merged[0] / "merge_report.json").read_text())
    assert rep.fidelity["original"] == pytest.approx(whole_report["fidelity"]["original"], rel=1e-5)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert rep.shards == len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    whole = AutoModelForCausalLM.from_pretrained(merged[0])
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(whole), atol=0, rtol=0)


def test_saves_the_requested_dtype(adapter, tmp_path):
    rep = merge(adapter, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert rep.dtype == "bfloat16" and rep.fidelity["dequantized"]["max_abs_logit_diff"] < 0.5  # bf16 rounding only


def test_refuses_a_non_empty_output_unless_overwrite(adapter, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_a_failure_mid_save_leaves_no_partial_output(adapter, tmp_path, monkeypatch):
    calls = []
    real_write = merge_module._SafetensorsWriter.write

    def failing_write(self, name, tensor):
        calls.append(self.path.name)
        if len(calls) == 20:
            raise OSError(28, "No space left on device (simulated)")
        real_write(self, name, tensor)

    monkeypatch.setattr(merge_module._SafetensorsWriter, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="simulated"):
        merge(adapter, out, max_shard_size="100KB")
    assert len(set(calls)) > 2  # it failed after writing whole shards
    assert list(tmp_path.iterdir()) == []  # no --out, no hidden temporary or scratch directory


def test_the_streamed_safetensors_files_read_back_exactly(tmp_path):
    plan = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(4).to(torch.bfloat16), "d": torch.ones(())}
    with merge_module._SafetensorsWriter(tmp_path / "x.safetensors", {k: v.to("meta") for k, v in plan.items()}) as w:
        for k, v in plan.items():
            w.write(k, v)
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == plan.keys() and all(torch.equal(back[k], plan[k]) for k in plan)
    with pytest.raises(Exception, match="not every planned tensor"):
        with merge_module._SafetensorsWriter(tmp_path / "y.safetensors", {"a": plan["a"].to("meta")}):
            pass


def test_weighted_adapters_make_a_loadable_model(adapter, adapter_b, tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["merge", str(adapter), str(adapter_b), "--weights", "0.7", "0.3",
                                 "--combination", "cat", "--out", str(tmp_path / "mix")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "mix" / "merge_report.json").read_text())
    assert report["weights"] == [0.7, 0.3] and report["combination"] == "cat" and len(report["adapters"]) == 2
    assert report["fidelity"]["dequantized"]["max_abs_logit_diff"] < 1e-4
    mix = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "mix"))
    # `cat` is exact: the merged delta is 0.7 * delta_a + 0.3 * delta_b, so the logits lie near neither adapter alone.
    trained = reference(tiny_model_dir, adapter, quantized=True)
    trained.load_adapter(str(adapter_b), adapter_name="b")
    trained.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix", combination_type="cat")
    trained.set_adapter("mix")
    torch.testing.assert_close(mix, logits(trained), atol=1e-4, rtol=1e-4)
    assert (mix - logits(reference(tiny_model_dir, adapter, quantized=True))).abs().max() > 1e-2


def test_ties_combination_loads(adapter, adapter_b, tmp_path):
    rep = merge([adapter, adapter_b], tmp_path / "ties", weights=[0.5, 0.5], combination="ties")
    assert rep.fidelity["dequantized"]["max_abs_logit_diff"] < 1e-4
    AutoModelForCausalLM.from_pretrained(tmp_path / "ties")


def test_plain_lora_adapter_merges_into_original_weights(tiny_model_dir, tmp_path):
    lora = make_adapter(tmp_path / "lora", tiny_model_dir, load_in_4bit=False)
    rep = merge(lora, tmp_path / "out")
    assert rep.base_weights == "original" and set(rep.fidelity) == {"original"}
    assert rep.fidelity["original"]["max_abs_logit_diff"] < 1e-4 and rep.notes
    with pytest.raises(Exception, match="needs a 4-bit adapter"):
        merge(lora, tmp_path / "out2", base_weights="dequantized")


def test_push_to_hub_without_credentials_fails_fast_and_clearly(adapter, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    result = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "m"), "--push-to-hub", "me/model"])
    assert result.exit_code == 2 and "Cannot push to the Hub repo 'me/model'" in result.output
    assert not (tmp_path / "m").exists()  # refused before merging
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        merge(adapter, tmp_path / "m", push_to_hub="me/model")
