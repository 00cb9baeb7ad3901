"""What a sweep varies: `key=v1,v2` overrides (or a `--grid` YAML file) parsed into fixed overrides, grid axes and
search ranges, every value checked against the recipe schema before anything runs, and the points' names.

- `key=value`: one value, applied to every point (e.g. `training.max_steps=50`).
- `key=v1,v2,...`: an axis; a grid takes the cartesian product of its axes in the order given (the last varies
  fastest); `--search` samples the values as a categorical. Commas inside brackets or braces stay in the value
  (`lora.target_modules=[q_proj,v_proj],[q_proj]` is two values).
- `key=low:high`, `low:high:log`, `low:high:int`, `low:high:int:log`: a range (only with `--search`).

A grid file maps dotted keys to a list (axis), a range string or one value (fixed), e.g.
`{lora.r: [2, 4], training.learning_rate: 1e-5:1e-3:log}`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


from finetune.errors import RecipeError
from finetune.recipe import Recipe, load_recipe, parse_yaml

RANGE = re.compile(r"(?P<low>[-+0-9.eE]+):(?P<high>[-+0-9.eE]+)(?P<int>:int)?(?P<log>:log)?")
OWNED = ("output_dir", "name")  # the sweep names each point's run directory itself
MAX_NAME = 48


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]  # each as override text (YAML), e.g. "2", "1e-3", "[q_proj, v_proj]"


@dataclass(frozen=True)
class Range:
    key: str
    low: float
    high: float
    integer: bool = False
    log: bool = False

    def text(self) -> str:
        return f"{self.key}={self.low:g}:{self.high:g}{':int' if self.integer else ''}{':log' if self.log else ''}"


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its directory name and the overrides that make it differ from the others."""

    name: str
    overrides: dict[str, str]

    def args(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]


@dataclass
class Space:
    fixed: list[str] = field(default_factory=list)
    axes: list[Axis] = field(default_factory=list)
    ranges: list[Range] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.axes] + [r.key for r in self.ranges]

    def grid(self) -> list[Point]:
        """Every combination of the axes' values, named (`name_points`)."""
        combos = itertools.product(*(a.values for a in self.axes))
        return name_points([dict(zip((a.key for a in self.axes), combo)) for combo in combos])


def parse_space(items: list[str], grid_file: Path | None = None) -> Space:
    """Sort `key=...` items (after those of the grid file) into fixed overrides, axes and ranges."""
    space = Space()
    entries = _grid_entries(grid_file) if grid_file else []
    entries += [(item, f"argument '{item}'") for item in items]
    seen: dict[str, str] = {}
    for item, where in entries:
        if "=" not in item:
            raise RecipeError(f"{where}: expected key=value or key=v1,v2,... (e.g. lora.r=8,16).")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key in OWNED:
            raise RecipeError(f"{where}: {key} is set by the sweep (each point trains into "
                              f"runs/<name>-sweep/<point>); sweep other keys.")
        if key in seen:
            raise RecipeError(f"{where}: {key} is also given by {seen[key]}; give each key once.")
        seen[key] = where
        values = split_values(raw)
        m = RANGE.fullmatch(raw)
        if m and len(values) == 1:
            space.ranges.append(_range(key, m, where))
        elif len(values) > 1:
            space.axes.append(Axis(key, tuple(values)))
        else:
            space.fixed.append(f"{key}={raw}")
    return space


def split_values(raw: str) -> list[str]:
    """Split on the commas outside brackets, braces and quotes."""
    out, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(raw):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            out.append(raw[start:i].strip())
            start = i + 1
    out.append(raw[start:].strip())
    return [v for v in out if v] if len(out) > 1 else out


def _range(key: str, m: re.Match, where: str) -> Range:
    try:
        low, high = float(m["low"]), float(m["high"])
    except ValueError:
        raise RecipeError(f"{where}: {key}: '{m[0]}' is not a range low:high[:int][:log] of numbers.") from None
    if not low < high or (m["log"] and low <= 0):
        raise RecipeError(f"{where}: {key}: a range needs low < high{' and low > 0 on a log scale' if m['log'] else ''}"
                          f" (got {m[0]}).")
    if m["int"] and (low != int(low) or high != int(high)):
        raise RecipeError(f"{where}: {key}: an :int range needs whole-number ends (got {m[0]}).")
    return Range(key, low, high, integer=bool(m["int"]), log=bool(m["log"]))


def _grid_entries(path: Path) -> list[tuple[str, str]]:
    """A grid file's entries as key=value items, each with its file:line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"Cannot read the grid file {path}: {e.strerror or e}.") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); a grid file is YAML.") from None
    root, data = parse_yaml(text, str(path))  # the recipe's bounded YAML: no alias bombs, depth or huge ints
    if not isinstance(data, dict) or not data:
        raise RecipeError(f"{path}: a grid file maps recipe keys to values, e.g. 'lora.r: [2, 4]'.")
    lines = {k.value: k.start_mark.line + 1 for k, _ in root.value}
    out = []
    for key, value in data.items():
        where = f"{path}:{lines.get(key, '?')}"
        if isinstance(value, list):
            if not value:
                raise RecipeError(f"{where}: {key}: an empty list sweeps nothing.")
            text = ",".join(_text(v) for v in value)
        else:
            text = _text(value)
        out.append((f"{key}={text}", where))
    return out


def _text(value) -> str:
    """A YAML value as override text (JSON is YAML; strings stay as written)."""
    return value if isinstance(value, str) else json.dumps(value)


def validate(recipe: Path, space: Space, points: list[Point]) -> Recipe:
    """Load the recipe with every swept value, then every point: an invalid value is named (RecipeError, exit 2)
    before anything runs. Returns the recipe with the fixed overrides."""
    base = load_recipe(recipe, space.fixed)
    checks = [(a.key, v) for a in space.axes for v in a.values]
    checks += [(r.key, _number(r, end)) for r in space.ranges for end in (r.low, r.high)]
    for key, value in checks:
        _check(recipe, space.fixed + [f"{key}={value}"], f"the swept value {key}={value}")
    for p in points:
        _check(recipe, space.fixed + p.args(), f"point {p.name} ({' '.join(p.args())})")
    return base


def _check(recipe: Path, overrides: list[str], what: str) -> Recipe:
    try:
        return load_recipe(recipe, overrides)
    except RecipeError as e:
        raise RecipeError(f"Sweep {what} is refused; nothing was run. {e}") from None


def _number(r: Range, v: float) -> str:
    return str(int(v)) if r.integer else repr(v)


def name_points(combos: list[dict[str, str]]) -> list[Point]:
    """Readable, stable names: a short form of each key (`lr` for learning_rate, the last part otherwise; none for
    `method`) joined to its value, e.g. `r2-lr0.001`; `p-<hash of the values>` for one that would be long or clash."""
    names = ["-".join(_short(k) + _clean(v) for k, v in c.items()) or "default" for c in combos]
    counts = {n: names.count(n) for n in names}
    names = [f"p-{digest(c)}" if counts[n] > 1 or len(n) > MAX_NAME or n.startswith(".") else n
             for n, c in zip(names, combos)]
    return [Point(n, c) for n, c in zip(names, combos)]


def digest(overrides: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def short_key(key: str) -> str:
    """A key's column title: its short form, or its last part where that is empty (`method`)."""
    return _short(key) or key.split(".")[-1]


def _short(key: str) -> str:
    last = key.split(".")[-1]
    if last == "method":
        return ""
    words = [w for w in last.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else last


def _clean(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_")
