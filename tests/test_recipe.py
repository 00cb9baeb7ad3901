"""Recipe validation: every mistake is named by file, line and key, before any model loads."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import RecipeError
from finetune.recipe.file import load_recipe

runner = CliRunner()


def write(tmp_path, body: str, name="r.yaml"):
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """\
model:
  name_or_path: {model}
data:
  train: {train}
training:
  learning_rate: 1.0e-3
  max_steps: 5
"""


def good(tmp_path):
    return write(tmp_path, GOOD.format(model=tmp_path, train=tmp_path / "train.jsonl"))


def test_valid_recipe_gets_defaults(tmp_path):
    r = load_recipe(good(tmp_path))
    assert r.name == "r"
    assert str(r.run_dir) == "runs/r"
    assert r.quantization.quant_type == "nf4" and r.quantization.double_quant
    assert r.training.optimizer == "paged_adamw_32bit"
    assert r.training.learning_rate == 1e-3
    assert r.data.train == [str(tmp_path / "train.jsonl")]


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, GOOD.format(model=tmp_path, train=tmp_path / "train.jsonl") + "  lerning_rate: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert f"{path}:8" in msg
    assert "training.lerning_rate" in msg and "Did you mean 'learning_rate'" in msg


def test_wrong_type_names_key_and_line(tmp_path):
    body = GOOD.format(model=tmp_path, train=tmp_path / "train.jsonl").replace("max_steps: 5", "max_steps: many")
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, body))
    assert ":7:" in str(e.value) and "training.max_steps" in str(e.value) and "'many'" in str(e.value)


def test_out_of_range(tmp_path):
    body = GOOD.format(model=tmp_path, train=tmp_path / "train.jsonl") + "lora:\n  dropout: 1.5\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, body))
    assert ":9:" in str(e.value) and "lora.dropout" in str(e.value) and "less than 1" in str(e.value)


def test_missing_data_file(tmp_path):
    path = write(tmp_path, GOOD.format(model=tmp_path, train=tmp_path / "nope.jsonl"))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert f"{path}:4" in str(e.value) and "nope.jsonl" in str(e.value) and "does not exist" in str(e.value)


def test_missing_required_section(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, f"model:\n  name_or_path: {tmp_path}\n"))
    assert "required key 'data' is missing" in str(e.value)


def test_broken_yaml_names_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "model:\n  name_or_path: [unclosed\ndata: {}\n"))
    assert "not valid YAML" in str(e.value)


def test_overrides_apply_and_are_validated(tmp_path):
    r = load_recipe(good(tmp_path), ["training.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "name=x"])
    assert r.training.max_steps == 7 and r.lora.target_modules == ["q_proj", "v_proj"] and r.name == "x"
    with pytest.raises(RecipeError) as e:
        load_recipe(good(tmp_path), ["training.max_step=7"])
    assert "command-line override 'training.max_step=7'" in str(e.value) and "Did you mean 'max_steps'" in str(e.value)
    with pytest.raises(RecipeError, match="key.sub=value"):
        load_recipe(good(tmp_path), ["training.max_steps"])


def test_compute_dtype_aliases(tmp_path):
    assert load_recipe(good(tmp_path), ["quantization.compute_dtype=bf16"]).quantization.compute_dtype == "bfloat16"


def test_cli_exit_code_2_without_traceback(tmp_path):
    path = write(tmp_path, GOOD.format(model=tmp_path, train=tmp_path / "train.jsonl") + "  lerning_rate: 0.1\n")
    for verb in ("validate", "train", "eval"):
        result = runner.invoke(app, [verb, str(path)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "lerning_rate" in result.output
    assert runner.invoke(app, ["validate", str(good(tmp_path))]).exit_code == 0


def test_bad_recipe_writes_nothing_and_loads_no_torch(tmp_path):
    """The error path must not import the heavy stack (it answers in well under 5 s) nor create a run dir."""
    path = write(tmp_path, GOOD.format(model=tmp_path, train=tmp_path / "missing.jsonl"))
    code = (
        "import sys\nfrom finetune.cli import app\n"
        "try:\n    app([\"train\", sys.argv[1]])\nexcept SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr
    assert "missing.jsonl" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_readme_recipe_reference_matches_the_schema():
    """docs/recipes.md's key table is generated from the schema; a stale table misleads users."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("recipe_reference", root / "scripts" / "recipe_reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    readme = (root / "docs" / "recipes.md").read_text()
    assert ref.render(readme) == readme, "docs/recipes.md's table is stale: run python scripts/recipe_reference.py"
