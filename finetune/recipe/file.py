"""Reading a recipe file: YAML with line numbers, `key.sub=value` overrides, and errors that name file:line:key.

`load_recipe(path, overrides)` reads the YAML, applies the overrides and validates everything
against the schema (recipe.py) before any model is loaded. Every problem is reported with the
recipe file, the YAML line (or the override) and the key, with "did you mean" for unknown keys.
Like recipe.py, this imports neither torch nor transformers.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import RecipeError
from finetune.recipe.schema import DATA_EXTENSIONS, Recipe, data_files
from finetune.recipe.yamltext import is_text as _is_text, parse_yaml


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file, line and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"Cannot read recipe {path}: {e.strerror or e}.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the recipe as UTF-8.") from None
    root, data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (model, data, training, ...).")
    where = {key: f"{path}:{line}" for key, line in _key_lines(root)}
    for item in overrides:
        key = _apply_override(data, item)
        for n in range(1, len(key)):  # a misspelt section in an override is named by the override too
            where.setdefault(key[:n], f"command-line override '{item}'")
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
    if not _is_text(item):
        raise RecipeError(f"command-line override {ascii(item)[:80]} is not valid text (undecodable bytes or a lone "
                          "surrogate).")
    label = f"command-line override '{item if len(item) <= 60 else item[:60] + '...'}'"
    if "=" not in item:
        raise RecipeError(f"{label} is not of the form key.sub=value (e.g. training.max_steps=10).")
    dotted, raw = item.split("=", 1)
    keys = tuple(k.strip() for k in dotted.split("."))
    if not all(keys):
        raise RecipeError(f"{label}: the key '{dotted[:60]}' has an empty part; write key.sub=value "
                          "(e.g. training.max_steps=10).")
    node = data
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{label}: '{'.'.join(keys[: i + 1])}' is a value, not a section.")
    try:
        node[keys[-1]] = parse_yaml(raw, label, lines=False)[1] if raw.strip() else None
    except RecipeError as e:
        if "not valid YAML" not in str(e):
            raise
        node[keys[-1]] = raw  # e.g. a: b, taken as the text it is
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
            keyed = getattr((e.get("ctx") or {}).get("error"), "key", None)  # recipe.section.KeyedError
            if not loc and keyed:  # a rule across sections that one key breaks: point at that key's line
                place = _locate(where, tuple(keyed.split(".")), _locate(where, ("training", "objective"), str(path)))
                lines.append(f"{place}: {msg}.")
            elif not loc:  # a rule across sections: it names its keys; point at the objective's line
                lines.append(f"{_locate(where, ('training', 'objective'), str(path))}: {msg}.")
            else:
                lines.append(f"{place}: {key}: {msg} (got {_short(e.get('input'))}).")
    return f"Invalid recipe {path}:\n" + "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: a 10 MB string in the recipe must not become a 10 MB message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


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
    data = recipe.data
    files = [(("data", "train", i), f) for i, f in enumerate(data.train)]
    files += [(("data", "datasets", i, "path"), d.path) for i, d in enumerate(data.datasets)]
    if isinstance(data.eval, str):
        files.append((("data", "eval"), data.eval))
    elif data.eval:
        files += [(("data", "eval", i, "path"), d.path) for i, d in enumerate(data.eval)]
    for loc, f in files:
        found = data_files(f)
        if found is None or found:  # a hub id, or local files
            continue
        key = ".".join(str(x) for x in loc)
        what = (f"pattern '{f}' matches no {'/'.join(DATA_EXTENSIONS)} file" if any(c in f for c in "*?[")
                else f"directory '{f}' holds no {'/'.join(DATA_EXTENSIONS)} file" if Path(f).expanduser().is_dir()
                else f"data file '{f}' does not exist")
        problems.append(
            f"{_locate(where, loc, str(path))}: {key}: {what} "
            f"(relative paths are read from the current directory, {Path.cwd()})."
        )
    name = recipe.model.name_or_path
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith(".gguf")
    if not Path(name).expanduser().exists() and looks_local:
        problems.append(
            f"{_locate(where, ('model', 'name_or_path'), str(path))}: model.name_or_path: "
            f"'{name}' is not a local directory nor a hub id (org/name)."
        )
    if problems:
        raise RecipeError(f"Invalid recipe {path}:\n" + "\n".join(problems))


def remote_code_warning(recipe: Recipe) -> str | None:
    """What `validate` warns about model code: with model.trust_remote_code true, the Python files transformers
    will import and run from the model directory (or that a hub model's own code will run); with it false, that the
    directory carries code that will not run. None when there is no code to speak of."""
    name = recipe.model.name_or_path
    local = Path(name).expanduser()
    files = sorted(p.name for p in local.glob("*.py")) if local.is_dir() else []
    if recipe.model.trust_remote_code:
        what = ", ".join(files) if files else ("none found locally" if local.is_dir() else "the hub repository's")
        return (f"model.trust_remote_code is true: loading {name} imports and runs its Python code ({what}) with "
                "your permissions. Read it first, or set it to false.")
    if files:
        return (f"{name} carries Python code ({', '.join(files)}); it is not run, because model.trust_remote_code is "
                "false (the default).")
    return None

