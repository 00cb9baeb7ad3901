"""The recipe: one YAML file that says what to fine-tune, on what, and how.

`load_recipe(path, overrides)` reads the YAML, applies `key.sub=value` overrides
and validates everything against the schema below before any model is loaded.
Every problem is reported with the recipe file, the YAML line (or the override)
and the key, so a user can fix it without reading code. Unknown keys are errors,
never silently ignored: a typo in a hyper-parameter must not train the wrong thing.

This module imports neither torch nor transformers, so `finetune validate` and
the error paths of every verb answer in well under a second.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.errors import RecipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name_or_path: str = Field(description="Hub id or local directory of the base model.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model.")


DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class QuantizationSection(Section):
    load_in_4bit: bool = Field(True, description="Quantize the frozen base to 4 bit (QLoRA); false = plain LoRA.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype: auto = bf16 on capable CUDA, fp16 on older CUDA, fp32 on CPU."
    )

    @field_validator("compute_dtype", mode="before")
    @classmethod
    def _alias(cls, v: Any) -> Any:
        return DTYPE_ALIASES.get(v, v) if isinstance(v, str) else v


class LoraSection(Section):
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="`all-linear`, or a list of module names such as [q_proj, v_proj]."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] = Field(default_factory=list, description="Extra modules trained in full and saved.")


class DataSection(Section):
    train: list[str] = Field(description="Training file(s): JSONL, one record per line.")
    eval: Optional[str] = Field(None, description="Held-out file for evaluation.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Without `eval`: fraction of train held out (fixed seed)."
    )
    format: Literal["alpaca", "chat", "completion", "text"] = Field(
        "alpaca",
        description="alpaca: instruction/input/output; chat: messages; completion: prompt/completion; text: text.",
    )
    max_length: int = Field(1024, ge=8, description="Tokens per example; longer ones are truncated.")
    train_on: Literal["completion", "all"] = Field(
        "completion", description="completion: loss on responses only; all: on every token."
    )
    chat_template: Optional[str] = Field(
        None, description="Jinja chat template for tokenizers without one (or to replace theirs)."
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")


class TrainingSection(Section):
    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass, per process.")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Micro batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up linearly.")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio.")
    scheduler: Literal[SCHEDULERS] = Field("cosine", description="Decay after warm-up.")  # type: ignore[valid-type]
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "paged_adamw_32bit", description="paged_* come from bitsandbytes (paging needs CUDA)."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    seed: int = Field(42, description="Seed for initialisation, dropout and shuffling.")
    logging_steps: int = Field(10, ge=1, description="Optimizer steps between metric lines.")
    eval_steps: Optional[int] = Field(None, ge=1, description="Steps between eval-loss passes (always at the end).")
    save_steps: Optional[int] = Field(None, ge=1, description="Steps between checkpoints (always at the end).")
    save_total_limit: Optional[int] = Field(
        None, ge=1, description="Keep only the newest K step checkpoints (older ones deleted after a save)."
    )
    keep_best: bool = Field(False, description="With save_total_limit: also keep the checkpoint with the best eval loss.")
    nan_policy: Literal["stop", "skip_step"] = Field(
        "stop", description="On a NaN/inf loss or gradient: stop (last checkpoint intact) or skip that step."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers (via accelerate); each needs its package."
    )


class Recipe(Section):
    name: Optional[str] = Field(None, description="Run name; defaults to the recipe file's name.")
    output_dir: Optional[str] = Field(None, description="Run directory; defaults to runs/<name>.")
    model: ModelSection
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.data.eval and self.data.eval_fraction:
            raise ValueError("give either data.eval or data.eval_fraction, not both")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / (self.name or "run"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"Cannot read recipe {path}: {e.strerror or e}.") from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (model, data, training, ...).")
    where = {key: f"{path}:{line}" for key, line in _key_lines(root)}
    for item in overrides:
        key = _apply_override(data, item)
        where[key] = f"command-line override '{item}'"
    data.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_explain(e, path, where)) from None
    _check_paths(recipe, path, where)
    return recipe


def _key_lines(node: Any, prefix: tuple = ()) -> list[tuple[tuple, int]]:
    """(key path, 1-based line) for every key and list item in a composed YAML tree."""
    out = []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (k.value,)
            out.append((key, k.start_mark.line + 1))
            out += _key_lines(v, key)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.append((prefix + (i,), v.start_mark.line + 1))
            out += _key_lines(v, prefix + (i,))
    return out


def _apply_override(data: dict, item: str) -> tuple:
    if "=" not in item:
        raise RecipeError(f"Override '{item}' is not of the form key.sub=value (e.g. training.max_steps=10).")
    dotted, raw = item.split("=", 1)
    keys = tuple(dotted.strip().split("."))
    node = data
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RecipeError(f"Override '{item}': '{'.'.join(keys[: i + 1])}' is a value, not a section.")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[keys[-1]] = raw
    return keys


def _locate(where: dict, loc: tuple, default: str) -> str:
    """The most specific known place for a key path (the key itself, else its section)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in where:
            return where[loc[:n]]
    return default


def _explain(err: ValidationError, path: Path, where: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        place = _locate(where, loc, str(path))
        if e["type"] == "extra_forbidden":
            section = _section_model(loc[:-1])
            valid = list(section.model_fields) if section else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(
                f"{place}: unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}."
            )
        elif e["type"] == "missing":
            lines.append(f"{place}: required key '{key}' is missing.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{place}: {key}: {msg} (got {e.get('input')!r}).")
    return f"Invalid recipe {path}:\n" + "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for k in loc:
        field = model.model_fields.get(k)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _check_paths(recipe: Recipe, path: Path, where: dict) -> None:
    """Files named by the recipe must exist before anything heavy starts."""
    problems = []
    files = [(("data", "train", i), f) for i, f in enumerate(recipe.data.train)]
    if recipe.data.eval:
        files.append((("data", "eval"), recipe.data.eval))
    for loc, f in files:
        if not Path(f).is_file():
            key = ".".join(str(x) for x in loc)
            problems.append(
                f"{_locate(where, loc, str(path))}: {key}: data file '{f}' does not exist "
                f"(relative paths are read from the current directory, {Path.cwd()})."
            )
    name = recipe.model.name_or_path
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if not Path(name).expanduser().exists() and looks_local:
        problems.append(
            f"{_locate(where, ('model', 'name_or_path'), str(path))}: model.name_or_path: "
            f"'{name}' is not a local directory nor a hub id (org/name)."
        )
    if problems:
        raise RecipeError(f"Invalid recipe {path}:\n" + "\n".join(problems))
