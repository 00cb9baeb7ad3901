"""A .gguf file as the base model: NF4-quantized on load like any base, read by plan and validate, merged into."""

import bitsandbytes as bnb
import pytest
import torch

pytest.importorskip("gguf")

from finetune.errors import RecipeError
from finetune.export.gguf import write_gguf
from finetune.recipe.schema import QuantizationSection
from finetune.recipe.file import load_recipe
from conftest import load_base

IDS = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 11]])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(tiny_model_dir, path, "f32")
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_GGUF_CACHE", str(tmp_path / "cache"))


def test_a_gguf_base_is_quantized_to_nf4_like_its_source(tiny_gguf, tiny_model_dir):
    q = QuantizationSection()
    from_gguf = load_base(str(tiny_gguf), q, "cpu").eval()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in from_gguf.modules())
    original = load_base(str(tiny_model_dir), q, "cpu").eval()
    with torch.no_grad():
        assert torch.equal(from_gguf(input_ids=IDS).logits, original(input_ids=IDS).logits)


def test_recipe_validation_and_plan_accept_a_gguf_file(tiny_gguf, tiny_model_dir, tmp_path):
    from conftest import write_jsonl

    from finetune.plan.memory import plan

    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"instruction": "Say hi.", "input": "", "output": "hi"}])
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"model:\n  name_or_path: {tiny_gguf}\ndata:\n  train: [{data}]\n")
    recipe = load_recipe(recipe_file, [])
    assert recipe.model.name_or_path == str(tiny_gguf)
    from_gguf = plan(recipe)
    original = plan(load_recipe(recipe_file, [f"model.name_or_path={tiny_model_dir}"]))
    # the same model, so the same terms (the data-independent ones at least)
    for term in original.terms:
        if "weights" in term.name or "LoRA" in term.name or "adapter" in term.name:
            assert from_gguf.term(term.name).bytes == term.bytes, term.name
    assert [t.name for t in from_gguf.terms] == [t.name for t in original.terms]
    with pytest.raises(RecipeError, match="missing.gguf"):
        load_recipe(recipe_file, [f"model.name_or_path={tmp_path / 'missing.gguf'}"])


def test_merge_into_a_gguf_base_says_where_the_weights_came_from(tiny_gguf, tiny_model_dir, tmp_path):
    from test_merge import make_adapter

    from finetune.merge.model import merge

    adapter = make_adapter(tmp_path / "adapter", tiny_model_dir)
    report = merge(adapter, tmp_path / "merged", base=str(tiny_gguf))
    assert any(f"dequantized from a F32 GGUF ({tiny_gguf})" in n for n in report.notes)
    assert report.fidelity["dequantized"]["top1_agreement"] == 1.0
