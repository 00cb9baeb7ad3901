"""IR-QLoRA: ICQ-NF4 (`quantization.quant_type: icq_nf4`; finetune/quant/icq.py, finetune/model/icq_base.py) and the
information elastic connection (`lora.use_iec`; finetune/model/iec.py), on the tiny model.

The formats: NF4 here is bitsandbytes' NF4 byte for byte; ICQ picks, per block, a shift from the reference's grid
whose codes have the most entropy (checked against quantizing with every candidate), dequantizes to
absmax * f[q] + tau, and folds a per-block update into tau. Training on an ICQ base with IEC: a killed and
resumed run is bit-identical; the checkpoint is a plain LoRA (A + beta_1 G_in, B + beta_2 G_out) whose logits over
the ICQ base are the trained model's; merge reproduces it; a rank that does not divide a layer is refused.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.quant import get_format
from finetune.quant.icq import candidates, quantization_error, search_tau
from finetune.quant.nf4 import code_entropy, nf4_codes, nf4_levels
from finetune.recipe.file import load_recipe

from conftest import training_model
from test_loftq import data, probe_logits, recipe_file, straight_and_resumed  # noqa: F401  (data: a fixture)
from test_training import adapter, assert_same_adapter, losses, train

runner = CliRunner()
STEPS = 3
IRQLORA = {"lora": {"use_iec": True}, "quantization": {"quant_type": "icq_nf4"}}

from test_training import one_thread  # noqa: E402,F401  (autouse: one thread for tiny matmuls)


@pytest.fixture(scope="module", autouse=True)
def icq_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FINETUNE_ICQ_CACHE", str(tmp_path_factory.mktemp("icq_cache")))
        yield


def skewed(rows=32, cols=256, seed=0):
    """Weights whose blocks are not centred on 0 (NF4 then leaves codes unused)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05 + torch.rand(rows, cols // 64, 1, generator=g).repeat_interleave(
        64, -1).view(rows, cols) * 0.04


def test_nf4_is_bitsandbytes_nf4_byte_for_byte():
    import bitsandbytes.functional as bnbf

    w = skewed()
    nf4 = get_format("nf4")
    p = nf4.pack(w)
    codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(p.data["codes"].flatten(), codes.flatten())
    assert torch.equal(p.data["absmax"].flatten(), state.absmax)
    assert torch.equal(nf4.dequantize(p), bnbf.dequantize_4bit(codes, state))


def test_icq_picks_a_most_informative_shift_of_the_grid_and_dequantizes_with_it():
    w = skewed()
    blocks = w.view(-1, 64)
    tau = search_tau(blocks)
    tau0 = blocks.median(-1).values
    grid = (tau0[None] + candidates()[:, None] * (blocks - tau0[:, None]).abs().amax(-1)[None]).half().float()
    every = code_entropy(nf4_codes(blocks[None] - grid[..., None])[0])  # quantize with every candidate
    chosen = code_entropy(nf4_codes(blocks - tau[:, None].float())[0])
    assert torch.allclose(chosen, every.amax(0))
    icq, nf4 = get_format("icq_nf4"), get_format("nf4")
    p = icq.pack(w)
    codes, absmax = nf4_codes(blocks - p.data["tau"].view(-1, 1).float())
    expected = nf4_levels()[codes.long()] * absmax[:, None] + p.data["tau"].view(-1, 1).float()
    assert torch.equal(icq.dequantize(p).view(-1, 64), expected)
    assert quantization_error(w, icq)["code_entropy_bits"] > quantization_error(w, nf4)["code_entropy_bits"]
    delta = torch.randn(w.shape[0], w.shape[1] // 64) * 0.01
    folded = icq.fold(p, delta)
    assert torch.equal(folded.data["codes"], p.data["codes"])
    assert torch.equal(folded.data["tau"], (p.data["tau"].float() + delta).half())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data):  # noqa: F811
    tmp = tmp_path_factory.mktemp("irqlora_runs")
    return straight_and_resumed(tmp, lambda d, **t: recipe_file(d, tiny_model_dir, data, **IRQLORA, **t))


def test_resume_is_bit_identical_and_the_checkpoint_is_a_plain_lora(runs):
    a, b = runs
    assert losses(a) == losses(b) and sorted(losses(a)) == list(range(1, STEPS + 1))
    assert_same_adapter(a / "checkpoint-final", b / "checkpoint-final", atol=0)
    saved = adapter(a / "checkpoint-final")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    config = json.loads((a / "checkpoint-final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_the_folded_checkpoint_computes_the_trained_model_and_merges(runs, tmp_path):
    from finetune.merge import merge
    from finetune.model import MethodRuntime, load_adapters, load_eval_model
    from finetune.train.checkpoint import load_training_state

    a, _ = runs
    ckpt = a / "checkpoint-final"
    recipe = load_recipe(ckpt / "recipe.yaml")
    trained = training_model(recipe)  # ICQ base + LoRA with IEC, set to the trained parameters themselves
    MethodRuntime(trained, recipe).load_state_dict(load_training_state(ckpt)[1]["method"])
    betas = [p for n, p in trained.named_parameters() if "variant_parameters.iec" in n]
    assert len(betas) == 4 and any(float(b.detach().abs().max()) > 0 for b in betas)  # IEC trained
    plain = load_adapters(load_eval_model(recipe.model, recipe.quantization, "cpu"), [str(ckpt)]).eval()
    torch.testing.assert_close(probe_logits(plain), probe_logits(trained.eval()), atol=1e-5, rtol=0)
    report = merge(str(ckpt), tmp_path / "merged")
    assert report.fidelity["dequantized"]["max_abs_logit_diff"] < 1e-4


def test_the_icq_packing_is_cached_by_content(runs, tiny_model_dir, monkeypatch):
    """The runs above packed the base once (one cache entry); loading it again reads the cache, searches nothing."""
    import os
    from pathlib import Path

    from finetune.model import load_base_model, resolve
    from finetune.quant.icq import ICQNF4

    assert len(list(Path(os.environ["FINETUNE_ICQ_CACHE"]).glob("*.safetensors"))) == 1
    q = load_recipe(runs[0] / "recipe.yaml").quantization
    first = load_base_model(str(tiny_model_dir), q, "cpu", resolve(q))
    monkeypatch.setattr(ICQNF4, "pack", lambda self, w: pytest.fail("searched again"))
    again = load_base_model(str(tiny_model_dir), q, "cpu", resolve(q))
    layer, same = first.model.layers[1].mlp.down_proj, again.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QuantLinear" and layer.format == "icq_nf4"
    assert all(torch.equal(layer.packed.data[k], same.packed.data[k]) for k in ("codes", "absmax", "tau"))


def test_a_rank_that_does_not_divide_a_layer_is_refused_naming_it(tmp_path, tiny_model_dir, data):  # noqa: F811
    path = recipe_file(tmp_path, tiny_model_dir, data, lora={"use_iec": True, "r": 3})
    result = train(path)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "lora.use_iec" in text and "q_proj" in text, result.output


@pytest.mark.parametrize(("body", "keys"), [
    ({"lora": {"use_iec": True, "use_dora": True}}, ["lora.use_dora", "use_iec"]),
    ({"lora": {"use_iec": True}, "adapter": {"method": "adamix"}}, ["lora.use_iec", "adamix"]),
    ({"quantization": {"quant_type": "icq4"}}, ["quantization.quant_type", "icq_nf4"]),
])
def test_refused_irqlora_settings_name_the_key(tmp_path, tiny_model_dir, data, body, keys):  # noqa: F811
    path = recipe_file(tmp_path, tiny_model_dir, data, lora=body.get("lora"), quantization=body.get("quantization"),
                       extra={k: v for k, v in body.items() if k not in ("lora", "quantization")})
    result = runner.invoke(app, ["validate", str(path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and all(k in text for k in keys), text
