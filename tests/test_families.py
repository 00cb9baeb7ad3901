"""Every model family finetune supports, end to end on a tiny random model of it (tests/family_models.py): the real
CLI, in process, runs train -> eval -> merge -> chat -> export -> read back, and each step is checked against an
independent number. docs/models.md's family x verb table is generated from FAMILY_ROWS and VERBS below
(scripts/models_table.py; `test_docs_table_is_the_generated_one` keeps it in step), so the table says exactly
what this module runs. The llama.cpp column is tests/test_llamacpp.py (slow: needs llama-cpp-python).

The recipes pin compute_dtype float32: the checks are exact equalities between two computations of one model.
"""

import json
import re
from pathlib import Path

import pytest
from test_training import data, one_thread  # noqa: F401  (fixtures: 20 toy rows + 8 eval; one thread)
from family_models import FAMILIES, MOE_FAMILIES, build_family_model
from conftest import recipe_file
from typer.testing import CliRunner

from finetune.cli import app

pytest.importorskip("gguf")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Repeat the word twice."

# family -> (the name docs/models.md shows, the export's read-back: transformers or gguf-reader, GGUF in)
FAMILY_ROWS = {
    "llama": ("Llama", "transformers", True), "mistral": ("Mistral", "transformers", True),
    "qwen2": ("Qwen2", "transformers", True), "qwen3": ("Qwen3", "transformers", True),
    "gemma2": ("Gemma 2", "transformers", True), "gemma3": ("Gemma 3 (text)", "transformers", True),
    "phi3": ("Phi-3", "transformers", True), "olmo2": ("OLMo 2", "gguf-reader", False),
    "granite": ("Granite", "gguf-reader", False), "gpt_neox": ("GPT-NeoX", "gguf-reader", False),
    "mixtral": ("Mixtral", "gguf-reader", False), "qwen3_moe": ("Qwen3-MoE", "transformers", True),
    "olmoe": ("OLMoE", "gguf-reader", False),
}
# verb -> how test_family_end_to_end verifies it (the docs table's legend)
VERBS = {
    "train": "`finetune train`, NF4 QLoRA, 2 steps: finite losses logged (MoE: experts and routers trained too, "
             "the routers' aux_loss logged)",
    "eval": "`finetune eval --adapter` recomputes the eval loss training logged at its last step (to 1e-5)",
    "merge": "`finetune merge`: merged model vs the 4-bit model + adapter, max |logit diff| <= 1e-4",
    "chat": "`finetune chat` greedy reply of the adapter == that of the merged model",
    "export": "`finetune export --type f32` of the merged model succeeds with the family's architecture",
    "read back": "the GGUF read back (transformers where it reads the family, else the gguf reader with every "
                 "transform undone): max |logit diff| <= 1e-4 vs the source, tokenizer ids equal",
    "GGUF in": "`model.name_or_path: file.gguf` converts to the same model (logits equal), or is refused naming "
               "the family",
    "llama.cpp": "slow, tests/test_llamacpp.py: the f16 GGUF's greedy reply in llama.cpp == `finetune chat`'s",
}


def docs_table() -> str:
    """The family x verb table of docs/models.md, from FAMILY_ROWS and VERBS."""
    head = "| family | architecture | " + " | ".join(VERBS) + " |"
    lines = [head, "|" + "---|" * (len(VERBS) + 2)]
    for family, (name, readback, gguf_in) in FAMILY_ROWS.items():
        cells = {v: "yes" for v in VERBS}
        cells["read back"] = "yes (transformers)" if readback == "transformers" else "yes (gguf reader)"
        cells["GGUF in"] = "yes" if gguf_in else "refused, named"
        lines.append(f"| {name} | {_arch_names(family)} | " + " | ".join(cells[v] for v in VERBS) + " |")
    legend = "\n".join(f"- **{v}**: {how}" for v, how in VERBS.items())
    return "\n".join(lines) + "\n\nHow each cell is verified (tests/test_families.py, one test per family):\n\n" + legend


def _arch_names(family: str) -> str:
    from finetune.export import FAMILIES as TABLE

    name = FAMILY_ROWS[family][0]
    return ", ".join(f"`{a}`" for f in TABLE if f.name == name for a in f.architectures)


def family_recipe(root: Path, family: str, model_dir: Path, data: Path, **lora) -> Path:
    """The family's recipe, root/family/<family>.yaml, run in root/family/runs/<family> (data: the directory with
    train.jsonl and eval.jsonl): NF4 QLoRA on every linear layer (and a mixture's experts and routers), 2 steps."""
    moe = {"target_experts": True, "train_router": True} if family in MOE_FAMILIES else {}
    return recipe_file(root / family, model_dir, data, family,
                       quantization={"load_in_4bit": True, "compute_dtype": "float32"},
                       lora={"dropout": 0.0, "target_modules": "all-linear", **moe, **lora},
                       max_steps=2, micro_batch_size=8, gradient_accumulation_steps=1, learning_rate=5e-3,
                       eval_steps=2, save_steps=2, warmup_steps=0)


def run_dir(root: Path, family: str) -> Path:
    return root / family / "runs" / family


def cli(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("family", list(FAMILY_ROWS))
def test_family_end_to_end(family, data, tiny_tokenizer_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    root = tmp_path
    model_dir = build_family_model(family, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), root / family / "base")
    recipe = family_recipe(root, family, model_dir, data)
    run = run_dir(root, family)

    cli("train", recipe)  # train
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    if family in MOE_FAMILIES:
        assert all(x["aux_loss"] > 0 for x in lines if "loss" in x)
        saved = json.loads((run / "checkpoint-final" / "adapter_config.json").read_text())
        assert saved["target_parameters"] and saved["modules_to_save"]
    logged = [x["eval_loss"] for x in lines if "eval_loss" in x][-1]

    ckpt = run / "checkpoint-final"
    cli("eval", recipe, "--adapter", ckpt, "--json", root / family / "eval.json")  # eval
    evaluated = json.loads((root / family / "eval.json").read_text())["models"]
    assert evaluated["adapter"]["metrics"]["loss"] == pytest.approx(logged, abs=1e-5)

    merged = root / family / "merged"
    cli("merge", ckpt, "--out", merged, "--dtype", "fp32")  # merge
    fidelity = json.loads((merged / "merge_report.json").read_text())["fidelity"]["dequantized"]
    assert fidelity["max_abs_logit_diff"] <= 1e-4 and fidelity["top1_agreement"] == 1.0

    monkeypatch.setenv("FINETUNE_CPU_DTYPE", "float32")  # the merged model's `auto` dtype: the adapter's float32
    replies = [cli("chat", target, "--prompt", PROMPT, "--max-new-tokens", 6) for target in (ckpt, merged)]  # chat
    assert replies[0] == replies[1] and replies[0].strip()

    gguf = root / family / "gguf" / f"{family}.gguf"
    gguf.parent.mkdir()
    cli("export", merged, "--out", gguf, "--type", "f32")  # export
    report = json.loads((gguf.parent / "export_report.json").read_text())
    from finetune.export import family_of

    assert report["architecture"] == family_of(json.loads((model_dir / "config.json").read_text())
                                               ["architectures"]).arch_name
    assert report["readback"] == FAMILY_ROWS[family][1]  # read back
    assert report["fidelity"]["max_abs_logit_diff"] <= 1e-4 and report["fidelity"]["top1_agreement"] == 1.0
    if family != "qwen2":  # transformers reads a qwen2 GGUF's tokenizer with Qwen2's own split rules, whatever it has
        assert all(report["tokenizer_agreement"].values()), report["tokenizer_agreement"]
    monkeypatch.setenv("FINETUNE_GGUF_CACHE", str(root / "gguf-cache"))
    _gguf_in(family, gguf, model_dir)


def _gguf_in(family: str, gguf: Path, model_dir: Path) -> None:
    """The exported file as a base model: the same model as its source, or refused naming the family."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.errors import ModelError
    from finetune.model import as_transformers_dir

    if not FAMILY_ROWS[family][2]:
        with pytest.raises(ModelError, match="Cannot start from the GGUF file"):
            as_transformers_dir(gguf)
        return
    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11, 200, 301]])
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
              for d in (as_transformers_dir(gguf), model_dir / ".." / "merged")]
    with torch.no_grad():
        a, b = (m(input_ids=ids).logits for m in models)
    assert (a - b).abs().max().item() <= 1e-4


def test_docs_table_is_the_generated_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("models_table", ROOT / "scripts" / "models_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, "docs/models.md's table is stale: run python scripts/models_table.py"
    assert docs_table() in (ROOT / "docs" / "models.md").read_text()
    assert list(FAMILY_ROWS) == list(FAMILIES)  # the rows are the families the tests build (and llama.cpp runs)


def test_validate_names_the_supported_architectures(data, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    recipe = family_recipe(tmp_path, "odd", odd, data)
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    for name in ("FalconForCausalLM", "MixtralForCausalLM", "Gemma2ForCausalLM", "GPTNeoXForCausalLM"):
        assert name in result.output


@pytest.mark.parametrize("setting, key", [
    ({"lora": {"target_experts": True, "dropout": 0.05}}, "lora.dropout"),
    ({"lora": {"target_experts": True, "dropout": 0.0, "use_dora": True}}, "lora.use_dora"),
    ({"lora": {"target_experts": True, "dropout": 0.0, "init": "olora"}}, "lora.init"),
    ({"adapter": {"method": "ia3"}, "lora": {}}, "adapter.method"),
    ({"lora": {"target_modules": ["q_proj", "w1"]}}, "lora.target_modules"),
    ({"lora": {"target_modules": ["gate", "v_proj"]}}, "lora.target_modules"),
])
def test_what_peft_cannot_train_on_experts_is_refused_by_key(setting, key, tmp_path, data):
    """Each at validate time, exit 2, the message naming the key (and no traceback)."""
    model = tmp_path / "mixtral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                                                   "num_local_experts": 4}))
    recipe = json.loads(family_recipe(tmp_path, "mixtral", model, data).read_text())
    recipe["lora"] = {"r": 4, **setting.get("lora", {})}
    recipe.update({k: v for k, v in setting.items() if k != "lora"})
    if "adapter" in setting:
        recipe.pop("lora")
    path = tmp_path / "moe.yaml"
    path.write_text(json.dumps(recipe))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and key in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("key", ["lora.target_experts=true", "lora.train_router=true",
                                 "training.router_aux_loss_coef=0.01"])
def test_moe_settings_on_a_dense_model_are_refused(key, tmp_path, tiny_model_dir, data):
    recipe = family_recipe(tmp_path, "llama", tiny_model_dir, data)
    result = runner.invoke(app, ["validate", str(recipe), key])
    assert result.exit_code == 2 and key.split("=")[0] in result.output and "no experts" in result.output


def test_trainable_parameters_with_and_without_expert_lora(tmp_path, tiny_tokenizer_dir, data):
    """Attention-only by default (routers frozen); the experts add r (in + out) per expert and projection, the
    routers their experts x hidden weights."""
    from transformers import AutoTokenizer

    from conftest import training_model
    from finetune.recipe.file import load_recipe

    model_dir = build_family_model("mixtral", AutoTokenizer.from_pretrained(tiny_tokenizer_dir), tmp_path / "m")
    counts = {}
    for name, lora in (("attention", {}), ("experts", {"target_experts": True}),
                       ("experts+router", {"target_experts": True, "train_router": True})):
        recipe = load_recipe(family_recipe(tmp_path, "mixtral", model_dir, data, **{"target_experts": False,
                                                                            "train_router": False, **lora}), [])
        model = training_model(recipe)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trained = {re.sub(r"layers\.\d+\.", "", n) for n, p in model.named_parameters() if p.requires_grad}
        if name == "attention":
            assert all("self_attn" in n for n in trained), trained
    r, hidden, ff, experts, layers = 4, 64, 128, 4, 2
    attention = layers * r * ((64 + 64) + (64 + 32) * 2 + (64 + 64))
    expert_lora = layers * experts * r * ((hidden + 2 * ff) + (ff + hidden))
    assert counts == {"attention": attention, "experts": attention + expert_lora,
                      "experts+router": attention + expert_lora + layers * experts * hidden}


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("experts", [False, True])
def test_moe_plan_terms_match_what_training_holds(family, experts, tmp_path, tiny_tokenizer_dir):
    """`finetune plan` on a mixture of experts: the weights it keeps unquantized (experts, routers) and the adapter
    are exactly what training loads; the activations (MoE block, expert LoRA's weights) within 10% of what
    autograd keeps."""
    import torch
    from conftest import training_model
    from test_plan import _storage_bytes, fp32_placement, saved_activation_bytes
    from transformers import AutoTokenizer

    from finetune.plan.terms import activation_bytes, meta_model, weight_bytes
    from finetune.recipe.schema import Recipe

    model_dir = build_family_model(family, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), tmp_path / family)
    recipe = Recipe.model_validate({
        "model": {"name_or_path": str(model_dir)}, "data": {"train": ["unused.jsonl"], "max_length": 24},
        "quantization": {"compute_dtype": "float32"}, "lora": {"dropout": 0.0, "target_experts": experts},
        "training": {"gradient_checkpointing": False, "micro_batch_size": 2}})
    model = training_model(recipe)
    meta = meta_model(recipe, fp32_placement(recipe))[0]
    _, kept = weight_bytes(meta, width=4)
    frozen_floats = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32]
    assert kept == _storage_bytes(frozen_floats)  # the expert tensors and routers among them
    trained = sorted(p.shape for p in model.parameters() if p.requires_grad)
    assert sorted(p.shape for p in meta.parameters() if p.requires_grad) == trained
    planned = activation_bytes(meta, recipe, 2, 24, 4, checkpointing=False)
    assert planned == pytest.approx(saved_activation_bytes(model), rel=0.1)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return build_family_model("mixtral", AutoTokenizer.from_pretrained(tiny_tokenizer_dir),
                              tmp_path_factory.mktemp("mixtral") / "base")


def test_moe_resume_is_exact(tiny_mixtral, data, tmp_path, monkeypatch):
    """Experts, routers and the aux loss through an interrupted run: resumed losses (aux included) and adapter
    equal the uninterrupted run's."""
    from test_training import assert_same_adapter, metrics, stop_after_save

    runs = {}
    for name in ("straight", "resumed"):
        path = family_recipe(tmp_path / name, "mixtral", tiny_mixtral, data)
        recipe = json.loads(path.read_text())
        recipe["training"].update(max_steps=3, save_steps=2, eval_steps=None)
        path.write_text(json.dumps(recipe))
        runs[name] = (path, run_dir(tmp_path / name, "mixtral"))
    cli("train", runs["straight"][0])
    with monkeypatch.context() as m:
        stop_after_save(m, 2)
        assert runner.invoke(app, ["train", str(runs["resumed"][0])]).exit_code == 130
    cli("train", runs["resumed"][0], "--resume")
    logged = [[(x["step"], x["loss"], x["aux_loss"]) for x in metrics(run) if "loss" in x] for _, run in runs.values()]
    assert logged[0] == logged[1] and len(logged[0]) == 3
    assert_same_adapter(runs["straight"][1] / "checkpoint-final", runs["resumed"][1] / "checkpoint-final", atol=0)


def moe_adapter(path: Path, model_dir: Path, seed: int, experts: bool) -> Path:
    """A random LoRA on the tiny Mixtral, laid out like a checkpoint: attention only, or attention and experts."""
    import torch
    import yaml
    from conftest import load_base
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from finetune.recipe.schema import QuantizationSection

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(load_base(str(model_dir), QuantizationSection()), config)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    (path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)},
                                                      "quantization": QuantizationSection().model_dump()}))
    return path


def test_serve_mixes_moe_attention_adapters_in_one_batch_and_keeps_expert_adapters_apart(tiny_mixtral, tmp_path):
    """Two attention adapters on a Mixtral share decoding steps (PEFT's mixed batch); once an adapter on the experts
    is loaded, no step mixes adapters (PEFT's expert wrapper refuses mixed batches); every reply equals
    `finetune chat`'s for that adapter alone."""
    import threading

    pytest.importorskip("openai")
    from test_serve import PROMPT as SERVE_PROMPT, Server, chat, until

    from finetune.generate.session import ChatOptions, load_session, reply
    from finetune.serve import ServeOptions, load

    paths = {"one": moe_adapter(tmp_path / "one", tiny_mixtral, 0, False),
             "two": moe_adapter(tmp_path / "two", tiny_mixtral, 1, False),
             "experts": moe_adapter(tmp_path / "experts", tiny_mixtral, 2, True)}
    alone = {name: reply(load_session(str(p)), SERVE_PROMPT, ChatOptions(max_new_tokens=6)) for name, p in paths.items()}
    server = Server(load(str(paths["one"]), adapters={"two": str(paths["two"])}, options=ServeOptions()), start=False)
    try:
        engine, client = server.serving.engine, server.client()

        def run(names) -> tuple[dict, list]:
            answers, batches = {}, []
            threads = [threading.Thread(target=lambda i=i, n=n: answers.__setitem__(
                i, chat(client, n, max_tokens=6).choices[0].message.content)) for i, n in enumerate(names)]
            for i, t in enumerate(threads):
                t.start()
                until(lambda: len(engine.waiting) == i + 1)
            while engine.waiting or engine.rows:
                engine.step()
                batches.append({r.job.adapter for r in engine.rows})
            for t in threads:
                t.join(30)
            return answers, batches

        mixed = engine.stats.mixed_steps
        answers, _ = run(["one", "two"])
        assert answers == {0: alone["one"], 1: alone["two"]} and engine.stats.mixed_steps > mixed
        assert server.post("/v1/adapters", {"name": "experts", "path": str(paths["experts"])}).status_code == 200
        mixed = engine.stats.mixed_steps
        answers, batches = run(["experts", "one", "two"])
        assert answers == {0: alone["experts"], 1: alone["one"], 2: alone["two"]}
        assert engine.stats.mixed_steps == mixed and all(len(b) <= 1 for b in batches)
    finally:
        server.stop()
