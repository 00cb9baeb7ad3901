"""The package layers README's code map states, checked against the code: an `ast` walk over finetune/.

Every import of a finetune module is an edge. An edge may go down the layer list or stay inside one
package; it may not go up, sideways between two packages of one layer, around a cycle, or into another
package's modules instead of through the names its `__init__` exports.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "finetune"


def layers(readme: str) -> list[list[str]]:
    """The numbered lines between the `layers:start` / `layers:end` markers: `1. errors, progress`."""
    block = readme.split("<!-- layers:start -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    return [re.findall(r"`([a-z_]+)`", line) for line in block.splitlines() if re.match(r"\s*\d+\.", line)]


def unit(module: str) -> str:
    """The package a module belongs to (`finetune.model.load` -> `model`), or the top-level module's name."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for every `from finetune... import` and `import finetune...` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "finetune"]
    return found


def exported(package_dir: Path) -> dict[str, dict[str, str]]:
    """package -> {public name: its module}, read from each `__init__`'s `lazy_exports(__name__, {...})` call."""
    out = {}
    for init in package_dir.glob("*/__init__.py"):
        for node in ast.walk(ast.parse(init.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "lazy_exports":
                modules = ast.literal_eval(node.args[1])
                out[init.parent.name] = {n: f"finetune.{init.parent.name}.{m}" for m, ns in modules.items() for n in ns}
    return out


def violations(package_dir: Path, order: list[list[str]]) -> list[str]:
    """Every import in package_dir that breaks the layers; empty when the code keeps them."""
    root = package_dir.parent
    rank = {name: i for i, layer in enumerate(order) for name in layer}
    public = exported(package_dir)
    found, graph = [], {}
    for path in sorted(package_dir.rglob("*.py")):
        me = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mine = unit(me)
        if mine not in rank and me not in ("finetune", "finetune.__main__"):
            found.append(f"{path.relative_to(root)}: {mine} is in no layer of README's code map")
            continue
        for line, target, names in imports(path):
            where = f"{path.relative_to(root)}:{line}"
            if target == "finetune":  # `from finetune import lazy_exports` (the package root helper)
                continue
            theirs = unit(target)
            # an edge to where each imported name really lives (a package's names are lazy, not imports)
            lives = {public.get(theirs, {}).get(n, target) for n in names} if target == f"finetune.{theirs}" else set()
            graph.setdefault(me, set()).update((lives or {target}) - {me})
            if theirs == mine:
                continue
            if theirs not in rank:
                found.append(f"{where}: imports {target}, which is in no layer")
            elif rank[theirs] > rank[mine]:
                found.append(f"{where}: {mine} (layer {rank[mine] + 1}) imports {target} (layer {rank[theirs] + 1}), "
                             "a layer above it")
            elif rank[theirs] == rank[mine]:
                found.append(f"{where}: {mine} and {theirs} share layer {rank[mine] + 1} and may not import each other")
            elif target.count(".") >= 2 and (package_dir / theirs).is_dir():
                found.append(f"{where}: imports {target} directly; import from finetune.{theirs} (its __init__ names "
                             "what others may use)")
            elif (package_dir / theirs).is_dir():
                found += [f"{where}: finetune.{theirs} does not export {n} (add it to its __init__)"
                          for n in names if n not in public.get(theirs, {})]
    return found + [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level cycles (a package's `__init__` counts as the package's module)."""
    seen, stack, out = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            out.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    return out


@pytest.fixture(scope="module")
def order() -> list[list[str]]:
    return layers((ROOT / "README.md").read_text())


def test_readme_states_the_layers_and_every_package_is_in_one(order):
    assert len(order) >= 5
    named = [n for layer in order for n in layer]
    assert len(named) == len(set(named)), "a package is in two layers"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert packages | modules <= set(named), f"missing from the layers: {sorted(packages | modules - set(named))}"
    assert modules == {"cli", "errors", "progress"}, "top level: cli.py, errors.py, progress.py only"


def test_the_code_keeps_the_layers(order):
    assert violations(PACKAGE, order) == []


def with_import(tmp_path: Path, module: str, line: str) -> tuple[Path, int]:
    """A copy of the package with `line` appended to `module`; returns the copy and that line's number."""
    import shutil

    copy = tmp_path / "finetune"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    path.write_text(path.read_text() + f"\n{line}  # deliberate\n")
    return copy, len(path.read_text().splitlines())


def test_an_upward_import_is_caught(order, tmp_path):
    """The check itself: a copy of the package with one deliberate upward import (model -> train) fails."""
    copy, line = with_import(tmp_path, "model/load.py", "from finetune.train import train")
    found = violations(copy, order)
    assert found[0].startswith(f"finetune/model/load.py:{line}: model (layer ") and "imports finetune.train" in found[0]
    assert found[0].endswith("a layer above it")
    rest = found[1:]  # and the cycle it closes: train's set-up imports model.load
    assert rest and all(f.startswith("import cycle: ") and "finetune.model.load" in f for f in rest), found


def test_an_import_around_a_package_front_is_caught(order, tmp_path):
    """Reaching into another package's module instead of its exported names fails too."""
    copy, line = with_import(tmp_path, "train/step.py", "from finetune.model.load import make_optimizer")
    found = violations(copy, order)
    assert found == [f"finetune/train/step.py:{line}: imports finetune.model.load "
                     "directly; import from finetune.model (its __init__ names what others may use)"]


def test_size_limits():
    """No module over 400 lines, no function over 80."""
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400]
    long = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{p.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert big == [] and long == []
