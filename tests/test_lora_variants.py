"""LoRA variants (rsLoRA, DoRA, per-layer targeting with rank/alpha patterns) on the tiny 4-bit model.

For each variant, through the real CLI: a short run and the same run killed after checkpoint-2 and resumed
(bit-identical losses and adapter); plain PEFT loads the checkpoint over the 4-bit base; `finetune merge`
reproduces base + adapter as trained within the plain-LoRA tolerance (max |logit difference| < 1e-4, float32);
padding-free rows give the padded losses. Variant facts are checked on the modules: rsLoRA's scale is
alpha / sqrt(r), DoRA's merged rows have the magnitude vector as their norms.
"""

import json
import math
import shutil
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from finetune.cli import app
from finetune.train.checkpoint import load_adapter_weights
from finetune.model import attach_lora, resolve
from finetune.recipe.file import load_recipe
from finetune.recipe.schema import QuantizationSection

from conftest import load_base, write_jsonl
from test_training import adapter, assert_same_adapter, losses, make_recipe, stop_after_save, train

runner = CliRunner()
STEPS = 3
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
VARIANTS = {
    "rslora": {"use_rslora": True, "init": "gaussian"},
    "dora": {"use_dora": True},
    "layers+patterns": {"target_modules": "all-linear", "layers": "1:", "rank_pattern": {"v_proj": 2},
                        "alpha_pattern": {"down_proj": 2}},
    "pissa": {"init": "pissa_niter_2"},  # randomised SVD: the init that must repeat on resume
    "olora": {"init": "olora"},
}
FULL_PRECISION = {"pissa", "olora"}  # refused on a 4-bit base (test_refused_combinations_...): trained on fp32 here
TOLERANCE = 1e-4  # max |logit difference| of a float32 merge from base + adapter, as for plain LoRA (test_merge.py)


from test_training import one_thread  # noqa: E402,F401  (autouse: one thread for tiny matmuls)


@pytest.fixture(scope="module")
def data(tmp_path_factory, toy_alpaca_rows):
    tmp = tmp_path_factory.mktemp("variant_data")
    write_jsonl(tmp / "train.jsonl", toy_alpaca_rows[:20])
    write_jsonl(tmp / "eval.jsonl", toy_alpaca_rows[40:44])
    return tmp


def variant_recipe(tmp, model_dir, data_dir, variant, name="run", **training):
    quantization = {"load_in_4bit": variant not in FULL_PRECISION, "compute_dtype": "float32"}  # float equalities
    path = make_recipe(tmp, model_dir, data_dir, name=name, quantization=quantization, max_steps=STEPS, **training)
    body = json.loads(path.read_text())
    body["lora"] = {**LORA, **VARIANTS[variant]}
    path.write_text(json.dumps(body))
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def runs(request, tmp_path_factory, tiny_model_dir, data):
    """(variant, straight run dir, resumed run dir): one run of STEPS steps, one killed after step 2 and resumed."""
    variant = request.param
    tmp = tmp_path_factory.mktemp(variant.replace("+", "_"))
    straight = variant_recipe(tmp / "a", tiny_model_dir, data, variant)
    assert (result := train(straight)).exit_code == 0, result.output
    resumed = variant_recipe(tmp / "b", tiny_model_dir, data, variant, save_steps=2)
    with pytest.MonkeyPatch.context() as m:
        stop_after_save(m, 2)
        assert train(resumed).exit_code == 130
    assert (result := train(resumed, "--resume")).exit_code == 0, result.output
    return variant, tmp / "a" / "runs" / "run", tmp / "b" / "runs" / "run"


def trained_model(model_dir, checkpoint):
    """Plain PEFT: the published base, quantized as in training, plus the checkpoint."""
    quantized = json.loads((checkpoint / "adapter_base.json").read_text())["trained_on"].startswith("4-bit")
    base = load_base(str(model_dir), QuantizationSection(load_in_4bit=quantized, compute_dtype="float32"), "cpu")
    return PeftModel.from_pretrained(base, str(checkpoint)).eval()


def as_trained(model_dir, checkpoint):
    """The model as training ran it: for PiSSA/OLoRA the residual base W - s B0 A0 (B0 A0 from the run's
    initial_adapter/, as PEFT computed it) plus the trained rank-r adapter, not the converted checkpoint."""
    recipe = load_recipe(checkpoint / "recipe.yaml")
    init = recipe.lora.init
    plain = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"init": "default"})})
    model = attach_lora(load_base(str(model_dir), recipe.quantization, "cpu"), plain, resolve(recipe.quantization))
    if init != "default" and init != "gaussian":
        b0a0 = load_file(checkpoint.parent / "initial_adapter" / "adapter_model.safetensors")
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, LoraLayer):
                    a0, b0 = (b0a0[f"{name}.lora_{x}.weight"] for x in "AB")
                    m.get_base_layer().weight -= m.scaling["default"] * b0 @ a0
    load_adapter_weights(model, checkpoint)
    return model.eval()


def test_resume_is_bit_identical(runs):
    _, a, b = runs
    assert losses(a) == losses(b) and sorted(losses(a)) == list(range(1, STEPS + 1))
    assert_same_adapter(a / "checkpoint-final", b / "checkpoint-final", atol=0)


def test_plain_peft_loads_the_checkpoint_with_the_variant(runs, tiny_model_dir):
    variant, a, _ = runs
    model = trained_model(tiny_model_dir, a / "checkpoint-final")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    saved = adapter(a / "checkpoint-final")
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    if variant == "rslora":
        assert {m.scaling["default"] for m in layers.values()} == {8 / math.sqrt(4)}
    if variant == "dora":
        assert all(m.use_dora["default"] for m in layers.values())
        assert sum("lora_magnitude_vector" in k for k in saved) == len(layers) == 4
    if variant in FULL_PRECISION:  # converted to a plain LoRA of twice the rank over the published weights
        assert {m.r["default"] for m in layers.values()} == {8} and len(layers) == 4
        assert (a / "checkpoint-final" / "residual_adapter.safetensors").is_file()
        record = json.loads((a / "checkpoint-final" / "adapter_base.json").read_text())
        assert record["relative_to"] == "published" and "residual" in record["trained_on"]
        ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11]])
        with torch.no_grad():  # plain PEFT over the published base is the model that was trained
            trained = as_trained(tiny_model_dir, a / "checkpoint-final")
            torch.testing.assert_close(model(ids).logits, trained(ids).logits, atol=TOLERANCE, rtol=0)
    if variant == "layers+patterns":
        assert all(".layers.1." in n for n in layers) and len(layers) == 7
        v, down, q = (layers[f"base_model.model.model.layers.1.{p}"] for p in
                      ("self_attn.v_proj", "mlp.down_proj", "self_attn.q_proj"))
        assert (v.r["default"], v.scaling["default"]) == (2, 8 / 2)
        assert (down.r["default"], down.scaling["default"]) == (4, 2 / 4)
        assert (q.r["default"], q.scaling["default"]) == (4, 8 / 4)


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory):
    variant, a, _ = runs
    out = tmp_path_factory.mktemp(f"merged_{variant.replace('+', '_')}") / "model"
    result = runner.invoke(app, ["merge", str(a / "checkpoint-final"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_merge_reproduces_base_plus_adapter(runs, merged, tiny_model_dir):
    variant, a, _ = runs
    report = json.loads((merged / "merge_report.json").read_text())
    chosen = "original" if variant in FULL_PRECISION else "dequantized"
    assert report["base_weights"] == chosen
    assert report["fidelity"][chosen]["max_abs_logit_diff"] < TOLERANCE
    assert report["fidelity"][chosen]["top1_agreement"] == 1.0
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11], [4, 8, 15, 16, 23, 42, 99, 2]])
    with torch.no_grad():
        mine = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        theirs = as_trained(tiny_model_dir, a / "checkpoint-final")(ids).logits
    torch.testing.assert_close(mine, theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("runs", ["dora"], indirect=True)
def test_dora_merged_rows_have_the_magnitude_as_norms(runs, merged):
    _, a, _ = runs
    saved = adapter(a / "checkpoint-final")
    weights = load_file(merged / "model.safetensors")
    checked = 0
    for key, magnitude in saved.items():
        if "lora_magnitude_vector" in key:
            module = key.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
            norms = torch.linalg.norm(weights[f"{module}.weight"], dim=1)
            torch.testing.assert_close(norms, magnitude, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked == 4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_free_and_packing_train_each_variant(variant, tmp_path, tiny_model_dir, data):
    """Padding-free rows give the padded losses; packed rows train (other rows, so other losses)."""
    runs_ = {}
    for name, training, packing in (("padded", {}, False), ("free", {"padding_free": True}, False),
                                    ("packed", {}, True)):
        path = variant_recipe(tmp_path, tiny_model_dir, data, variant, name=name, **training)
        body = json.loads(path.read_text())
        body["lora"]["dropout"] = 0.0
        body["training"]["max_steps"] = 2
        body["data"]["packing"] = packing
        path.write_text(json.dumps(body))
        assert (result := train(path)).exit_code == 0, result.output
        runs_[name] = losses(tmp_path / "runs" / name)
    assert runs_["free"].keys() == runs_["padded"].keys() == {1, 2}
    for step in (1, 2):
        assert runs_["free"][step] == pytest.approx(runs_["padded"][step], abs=1e-4)
    assert all(math.isfinite(x) for x in runs_["packed"].values())


@pytest.mark.parametrize(("lora", "keys"), [
    ({"init": "pissa"}, ["lora.init", "quantization.load_in_4bit"]),
    ({"init": "olora"}, ["lora.init", "quantization.load_in_4bit"]),
    ({"init": "loftq", "4bit": False}, ["lora.init", "quantization.load_in_4bit"]),
    ({"init": "pisa"}, ["lora.init", "Did you mean 'pissa'"]),
    ({"layers": "3-1"}, ["lora.layers", "empty"]),
    ({"rank_pattern": {"v_proj": 0}}, ["lora.rank_pattern", "positive"]),
    ({"use_droa": True}, ["use_droa", "use_dora"]),
    ({"init": "pissa", "use_dora": True, "4bit": False}, ["lora.init", "lora.use_dora"]),
    ({"init": "olora", "modules_to_save": ["lm_head"], "4bit": False}, ["lora.init", "lora.modules_to_save"]),
])
def test_refused_combinations_are_recipe_errors_before_any_model_loads(lora, keys, tmp_path, tiny_model_dir,
                                                                         data, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("finetune.train.setup.load_base_model", no_loading)
    path = variant_recipe(tmp_path, tiny_model_dir, data, "rslora")
    body = json.loads(path.read_text())
    lora = dict(lora)
    body["quantization"]["load_in_4bit"] = lora.pop("4bit", True)
    body["lora"] = {**LORA, **lora}
    path.write_text(json.dumps(body))
    result = train(path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for key in keys:
        assert key in text, text


def test_layers_beyond_the_model_are_a_recipe_error(tmp_path, tiny_model_dir, data):
    path = variant_recipe(tmp_path, tiny_model_dir, data, "rslora")
    body = json.loads(path.read_text())
    body["lora"] = {**LORA, "layers": [0, 5]}
    path.write_text(json.dumps(body))
    result = train(path)
    assert result.exit_code == 2 and "lora.layers" in result.output and "0-1" in result.output, result.output


def test_plan_counts_each_variants_parameters(tiny_model_dir, data, tmp_path):
    """DoRA adds one magnitude per output feature of every adapted layer; patterns change the ranks."""
    counts = {}
    for variant in ["plain", *VARIANTS]:
        path = variant_recipe(tmp_path, tiny_model_dir, data, "rslora" if variant == "plain" else variant, name=variant)
        if variant == "plain":
            body = json.loads(path.read_text())
            body["lora"] = LORA
            path.write_text(json.dumps(body))
        result = runner.invoke(app, ["plan", str(path)])
        assert result.exit_code == 0, result.output
        counts[variant] = int(next(x for x in result.output.split("\n") if "trainable" in x)
                              .split(" trainable")[0].split()[-1].replace(",", ""))
    h, kv = 64, 32  # q_proj 64 -> 64, v_proj 64 -> 32 (2 key/value heads of 16)
    plain = 2 * (4 * (h + h) + 4 * (h + kv))
    assert counts["plain"] == counts["rslora"] == counts["pissa"] == counts["olora"] == plain
    assert counts["dora"] == plain + 2 * (h + kv)
    i = 128  # layer 1 only: q k v o gate up down, v at rank 2
    assert counts["layers+patterns"] == 4 * ((h + h) + (h + kv) + (h + h) + 2 * (h + i) + (i + h)) + 2 * (h + kv)


def test_export_writes_the_merged_variant(runs, merged, tmp_path):
    """`finetune export` of the checkpoint holds the merge's weights (the same code path) and reloads to its logits."""
    variant, a, _ = runs
    out = tmp_path / "model.gguf"
    result = runner.invoke(app, ["export", str(a / "checkpoint-final"), "--out", str(out), "--type", "f32"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["merge_fidelity"]["max_abs_logit_diff"] < TOLERANCE
    assert report["fidelity"]["max_abs_logit_diff"] <= 1e-4
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11]])
    with torch.no_grad():
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)(ids).logits
        mine = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    torch.testing.assert_close(back, mine, atol=1e-4, rtol=0)
    if variant in ("rslora", "dora"):  # llama.cpp's adapter format has no rsLoRA scale and no magnitude vector
        result = runner.invoke(app, ["export", str(a / "checkpoint-final"), "--adapter-only",
                                     "--out", str(tmp_path / "lora.gguf")])
        assert result.exit_code == 2 and f"use_{variant}" in result.output, result.output


@pytest.mark.slow  # CI time (make test-slow runs it): two processes vs one are test_distributed's; this adds the variants
@pytest.mark.parametrize("variants", [("rslora", "dora", "layers+patterns"), ("pissa",)], ids=["4bit-mix", "pissa"])
def test_two_processes_give_the_losses_of_one(variants, tmp_path, tiny_model_dir, data):
    """DDP (2 CPU processes, gloo) with the same effective batch: the same step losses as 1 process."""
    from test_distributed import launch

    lora = {**LORA, "dropout": 0.0}  # dropout draws differ between one and two processes
    for v in variants:
        lora.update(VARIANTS[v])
    paths = {}
    for name, accumulation in (("one", 4), ("two", 2)):
        paths[name] = variant_recipe(tmp_path, tiny_model_dir, data, variants[0], name=name,
                                     gradient_accumulation_steps=accumulation, micro_batch_size=2)
        body = json.loads(paths[name].read_text())
        body["lora"] = lora
        paths[name].write_text(json.dumps(body))
    assert (result := train(paths["one"])).exit_code == 0, result.output
    launch([sys.executable, "-m", "finetune", "train", str(paths["two"]), "--nproc", "2"], cwd=tmp_path)
    one, two = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert one.keys() == two.keys() == set(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5 * max(1.0, abs(one[step]))), step


def test_layer_ranges_as_written_on_the_command_line(tmp_path, tiny_model_dir, data):
    """`lora.layers=1:` (YAML reads {1: None}) and `lora.layers=1` mean layers 1..last and layer 1."""
    path = variant_recipe(tmp_path, tiny_model_dir, data, "rslora")
    assert load_recipe(path, ["lora.layers=1:"]).lora.layer_indices(2) == [1]
    assert load_recipe(path, ["lora.layers=1"]).lora.layer_indices(2) == [1]
    assert load_recipe(path, ["lora.layers=0-1"]).lora.layer_indices(2) == [0, 1]
    assert load_recipe(path, ["lora.layers=[0]"]).lora.layer_indices(2) == [0]


@pytest.mark.parametrize("runs", ["pissa"], indirect=True)
def test_resume_refuses_a_residual_base_that_differs_from_the_one_trained_on(runs, tmp_path):
    """The decomposition re-run on resume is compared with the run's B0 A0: another residual base is an error."""
    from safetensors.torch import save_file

    _, _, b = runs
    copy = tmp_path / "runs" / "run"
    shutil.copytree(b, copy)
    shutil.rmtree(copy / "checkpoint-final")
    (copy / "summary.json").unlink()
    initial = copy / "initial_adapter" / "adapter_model.safetensors"
    tensors = load_file(initial)
    tensors[next(iter(tensors))] += 1e-6
    save_file(tensors, initial)
    recipe = json.loads((b.parent.parent / "run.yaml").read_text())
    recipe["output_dir"] = str(copy)
    (tmp_path / "run.yaml").write_text(json.dumps(recipe))
    result = train(tmp_path / "run.yaml", "--resume")
    assert result.exit_code == 2 and "initialisation re-run" in " ".join(result.output.split()), result.output
