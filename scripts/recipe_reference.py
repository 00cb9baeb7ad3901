"""Write the recipe reference table into docs/recipes.md from the schema itself.

The table lives between two marker comments in docs/recipes.md; tests/test_recipe.py
fails when it is out of date, so documentation cannot drift from the schema.
Run: python scripts/recipe_reference.py   (rewrites docs/recipes.md in place; --file PATH: another file with the markers)
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.recipe.schema import Recipe  # noqa: E402

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"
PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if origin is typing.Annotated:  # a constrained type, e.g. PathText: the table shows the base type
        return _type_name(typing.get_args(ann)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory else field.default
    if isinstance(value, BaseModel):
        return ""
    return "" if value is None else f"`{value}`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        ann = field.annotation
        inner = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, key + ".")
            continue
        if typing.get_origin(ann) is list and inner:  # a list of sub-sections, e.g. data.datasets
            rows.append(f"| `{key}` | {_type_name(ann)} | {_default(field)} | {field.description or ''} |")
            rows += _rows(inner[0], key + "[].")
            continue
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(ann)} | {_default(field)} | {desc} |")
    return rows


def table() -> str:
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(head + _rows(Recipe))


def render(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table() + "\n" + readme[end:]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=PAGE, help="The file whose table to rewrite (default: docs/recipes.md).")
    path = ap.parse_args().file
    path.write_text(render(path.read_text()))
    print(f"updated the recipe reference in {path}")
