"""YAML text a user wrote (a recipe file, an override's value) parsed within bounds, or a RecipeError saying why not.

PyYAML alone lets a few hundred bytes expand to gigabytes (aliases of aliases, "billion laughs"), recurses until
Python's stack runs out on deep nesting, and raises ValueError for an integer of over 4300 digits. Before any
Python object is built, `parse_yaml` walks the composed node graph once (each node counted once per path that
reaches it, memoized, so the walk is linear in the document while the count is what construction would build)
and refuses:

- more than MAX_VALUES values after alias expansion, or nesting deeper than MAX_DEPTH;
- an alias that contains itself;
- an integer outside the 64 bits every consumer (torch, numpy, the file system) takes;
- text that cannot be written back as UTF-8 (a lone surrogate from a "\\ud800" escape).

Every refusal names `where` (the file) and the line.
"""

from __future__ import annotations

from typing import Any

import yaml

from finetune.errors import RecipeError

MAX_VALUES = 100_000  # a recipe has a few hundred; more is an alias bomb or not a recipe
MAX_DEPTH = 64
_INT_TAG = "tag:yaml.org,2002:int"


def is_text(s: str) -> bool:
    """True when `s` encodes as UTF-8 (no lone surrogates, e.g. from undecodable argv bytes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_yaml(text: str, where: str, lines: bool = True) -> tuple[yaml.Node | None, Any]:
    """(composed node tree, Python value) of `text`; RecipeError naming `where`:line (`where` alone when not
    `lines`, e.g. for a one-line override) for anything out of bounds."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        place = f"{where}:{mark.line + 1}" if mark and lines else where
        raise RecipeError(f"{place}: not valid YAML ({getattr(e, 'problem', None) or e}).") from None
    except RecursionError:
        raise RecipeError(f"{where}: not valid YAML (nested deeper than this parser can follow).") from None
    if root is None:
        return None, None
    _check(root, where, lines)
    try:
        return root, yaml.safe_load(text)
    except yaml.YAMLError as e:  # construction errors: unknown tags, unhashable keys
        mark = getattr(e, "problem_mark", None)
        place = f"{where}:{mark.line + 1}" if mark and lines else where
        raise RecipeError(f"{place}: not valid YAML ({getattr(e, 'problem', None) or e}).") from None


def _check(root: yaml.Node, where: str, lines: bool) -> None:
    """Count values with aliases expanded (memoized by node), and check depth, cycles, integers and text."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    loader = yaml.SafeLoader("")

    def refuse(node: yaml.Node, what: str) -> None:
        raise RecipeError(f"{where}:{node.start_mark.line + 1}: {what}." if lines else f"{where}: {what}.")

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            refuse(node, "a YAML alias refers to a value that contains it")
        if depth > MAX_DEPTH:
            refuse(node, f"values nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.ScalarNode):
            if not is_text(node.value):
                refuse(node, "text with a lone surrogate (e.g. \"\\ud800\"), which cannot be written as UTF-8")
            if node.tag == _INT_TAG and (len(node.value) > 40 or abs(loader.construct_yaml_int(node)) >= 2**63):
                refuse(node, f"the integer {node.value[:20]}... ({len(node.value)} characters) does not fit in "
                       "64 bits")
            sizes[key] = 1
            return 1
        active.add(key)
        kids = node.value if isinstance(node, yaml.SequenceNode) else [x for kv in node.value for x in kv]
        total = 1
        for kid in kids:
            total += size(kid, depth + 1)
            if total > MAX_VALUES:
                refuse(node, f"more than {MAX_VALUES:,} values once its YAML aliases are expanded")
        active.discard(key)
        sizes[key] = total
        return total

    size(root, 0)
