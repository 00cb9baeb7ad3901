"""Every `finetune ...` command shown in README.md and docs/*.md is checked against the real CLI, so the documentation
cannot drift from it: the verb exists, every `--option` it names is in that verb's `--help` (and a value an option
only accepts from a list is one of them), and a recipe with its `key=value` overrides passes `finetune validate`
(a sweep's items pass the sweep's own checks). Commands are read from the shell code blocks (```bash, ```sh or
unlabelled), with line continuations joined, comments dropped, pipes and `&&` split, `$(...)` and `$VAR` taken as
placeholders; `python -m finetune`, `torchrun ... -m finetune` and `accelerate launch ... -m finetune` count too.
The typer app is invoked in-process (no subprocesses), so the whole file takes a few seconds."""

from __future__ import annotations

import re
import shlex
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import typer
import typer.testing
from typer.testing import CliRunner

from finetune.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console", "zsh"}
PLACEHOLDER = "__PLACEHOLDER__"
OPERATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "2>", "2>>"}
runner = CliRunner()


@dataclass
class Command:
    where: str  # docs/serve.md:12
    text: str  # the command line as shown (continuations joined)
    argv: list[str]  # after `finetune`
    verb: str = ""
    options: list[tuple[str, str | None]] = field(default_factory=list)  # (--name, value or None for a flag)
    positionals: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ reading the docs


def shell_blocks(text: str):
    """(first line number, block text) of every fenced shell code block."""
    lines, i = text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"\s*```+\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        if m[1].lower() in SHELL:
            yield i + 2, "\n".join(lines[i + 1:end])
        i = end + 1


def logical_lines(block: str, first: int):
    """(line number, text) with backslash continuations joined."""
    buf, start = "", None
    for n, line in enumerate(block.split("\n"), first):
        start = n if start is None else start
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf, start = "", None
    if buf.strip():
        yield start, buf


def without_substitutions(line: str) -> str:
    """`$(...)` (nested too) and backquotes replaced by one placeholder word each."""
    out, i = [], 0
    while i < len(line):
        if line.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(line) and depth:
                depth += {"(": 1, ")": -1}.get(line[j], 0)
                j += 1
            out.append(PLACEHOLDER)
            i = j
        elif line[i] == "`" and "`" in line[i + 1:]:
            out.append(PLACEHOLDER)
            i = line.index("`", i + 1) + 1
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def words(line: str) -> list[str]:
    lexer = shlex.shlex(without_substitutions(line), posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split, lexer.commenters = True, "#"
    return [PLACEHOLDER if "$" in w else w for w in lexer]


def invocations(ws: list[str]) -> list[list[str]]:
    """The argv after `finetune` of each finetune command in a shell line (pipes, `&&`, `;` split it)."""
    segments, cur, skip = [], [], False
    for w in ws:
        if skip:
            skip = False
        elif w in OPERATORS:
            segments.append(cur)
            cur = []
        elif w in REDIRECTS:
            skip = True
        else:
            cur.append(w)
    segments.append(cur)
    found = []
    for seg in segments:
        while seg and re.fullmatch(r"[A-Za-z_]\w*=.*", seg[0]):  # VAR=value before the command
            seg = seg[1:]
        for i, w in enumerate(seg):
            if w == "finetune" and i > 0 and seg[i - 1] == "-m" or i == 0 and Path(w).name == "finetune":
                found.append(seg[i + 1:])
                break
    return found


def shown(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def documented_commands(pages=PAGES) -> list[Command]:
    out = []
    for page in pages:
        for first, block in shell_blocks(page.read_text(encoding="utf-8")):
            for n, line in logical_lines(block, first):
                for argv in invocations(words(line)):
                    out.append(Command(f"{shown(page)}:{n}", " ".join(line.split()), argv))
    return out


# ------------------------------------------------------------------ the CLI


@cache
def verbs() -> dict:
    return dict(typer.main.get_command(app).commands)


@cache
def annotations(verb: str) -> dict:
    """The verb's parameters' Python types (typer makes options of them: Literal choices, int, float)."""
    info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == verb)
    return typing.get_type_hints(info.callback)


def value_problem(ann, value: str) -> str | None:
    """What is wrong with `value` for an option of type `ann` (Optional and list unwrapped), or None."""
    while typing.get_origin(ann) in (typing.Union, list, getattr(__import__("types"), "UnionType", None)):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if typing.get_origin(ann) is typing.Literal and value not in map(str, typing.get_args(ann)):
        return f"'{value}' is not one of {', '.join(map(str, typing.get_args(ann)))}"
    if ann in (int, float):
        try:
            ann(value)
        except ValueError:
            return f"'{value}' is not {'an integer' if ann is int else 'a number'}"
    return None


@cache
def help_options(verb: str) -> frozenset[str]:
    """The long options that `finetune VERB --help` lists (typer's rich help, wide enough not to wrap)."""
    res = runner.invoke(app, [verb, "--help"], env={"TERMINAL_WIDTH": "240", "COLUMNS": "240"})
    assert res.exit_code == 0, res.output
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.output)  # colours, where the environment forces them
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))


def parse(cmd: Command) -> list[str]:
    """Split argv into verb, options and positionals the way click does; the problems found on the way."""
    argv = list(cmd.argv)
    while argv and argv[0] in ("--debug",):  # the one global option
        argv.pop(0)
    if not argv:
        return [] if cmd.argv in ([], ["--help"]) else [f"no verb in `{cmd.text}`"]
    cmd.verb = argv.pop(0)
    if cmd.verb not in verbs():
        return [f"`finetune {cmd.verb}` is no verb of the CLI (verbs: {', '.join(verbs())})"]
    command = verbs()[cmd.verb]
    by_name = {o: p for p in command.params if p.param_type_name == "option" for o in p.opts + p.secondary_opts}
    problems = []
    while argv:
        w = argv.pop(0)
        if not (w.startswith("-") and len(w) > 1 and not re.fullmatch(r"-[\d.]+(e-?\d+)?", w)):
            cmd.positionals.append(w)
            continue
        name, eq, value = w.partition("=")
        if name in ("--help", "-h"):
            continue
        if name not in help_options(cmd.verb) or name not in by_name:
            problems.append(f"`finetune {cmd.verb}` has no option {name} (see `finetune {cmd.verb} --help`)")
            continue
        param = by_name[name]
        if param.is_flag:
            cmd.options.append((name, None))
            continue
        if not eq:
            value = argv.pop(0) if argv else None
        if value is None:
            problems.append(f"{name} needs a value")
            continue
        cmd.options.append((name, value))
        wrong = value_problem(annotations(cmd.verb)[param.name], value) if value != PLACEHOLDER else None
        if wrong:
            problems.append(f"{name} {value}: {wrong} (see `finetune {cmd.verb} --help`)")
    return problems


def recipe_checks(cmd: Command) -> list[str]:
    """A recipe named as the verb's first argument, with the overrides after it, through `finetune validate` (the
    sweep's items through the sweep's own parsing and validation of every point)."""
    if not cmd.positionals or not cmd.positionals[0].endswith((".yaml", ".yml")):
        return []
    if cmd.verb in ("merge", "verify", "export", "board"):
        return []
    recipe, rest = cmd.positionals[0], cmd.positionals[1:]
    if not (ROOT / recipe).is_file():
        return [f"the recipe {recipe} does not exist"]
    if any(PLACEHOLDER in r for r in rest):
        return [f"an override with a placeholder cannot be checked: {' '.join(rest)}"]
    if cmd.verb == "sweep":
        return sweep_checks(recipe, rest, grid=dict(cmd.options).get("--grid"))
    return validated(recipe, tuple(rest) + fetched_model_stand_in(recipe))


def fetched_model_stand_in(recipe: str) -> tuple[str, ...]:
    """`make fetch` puts the real model under models/ (a directory, and the Q4_1 .gguf beside it); on a fresh clone
    the recipe is validated against an empty stand-in of the same kind and name (validate only checks it exists)."""
    import tempfile

    import yaml

    name = str((yaml.safe_load((ROOT / recipe).read_text()).get("model") or {}).get("name_or_path", ""))
    if not name.startswith("models/") or (ROOT / name).exists():
        return ()
    stand_in = Path(tempfile.gettempdir()) / "finetune-docs-models" / Path(name).name
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.touch() if name.endswith(".gguf") else stand_in.mkdir(exist_ok=True)
    return (f"model.name_or_path={stand_in}",)


@cache
def validated(recipe: str, overrides: tuple[str, ...]) -> list[str]:
    res = runner.invoke(app, ["validate", recipe, *overrides])
    if res.exit_code != 0:
        return [f"`finetune validate {recipe} {' '.join(overrides)}` exits {res.exit_code}:\n    "
                + " ".join(res.output.split())]
    return []


def sweep_checks(recipe: str, items: list[str], grid: str | None) -> list[str]:
    from finetune.errors import RecipeError
    from finetune.sweep.space import parse_space, validate

    try:
        space = parse_space(items)  # a --grid file named in the docs is an example: its keys are not checked here
        validate(Path(recipe), space, space.grid())
    except RecipeError as e:
        return [f"`finetune sweep {recipe} {' '.join(items)}`{' (--grid ' + grid + ')' if grid else ''}: {e}"]
    return []


def problems_of(commands: list[Command]) -> list[str]:
    out = []
    for cmd in commands:
        found = parse(cmd)
        found += recipe_checks(cmd) if not found and cmd.verb else []
        out += [f"{cmd.where}: `finetune {' '.join(cmd.argv)}`\n  {p}" for p in found]
    return out


# ------------------------------------------------------------------ tests


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths (recipes/..., data/...) are relative to the repository
    # typer's CliRunner rebuilds the click command from the app on every invoke (~0.1 s each): build it once
    monkeypatch.setattr(typer.testing, "_get_command", cache(typer.main.get_command), raising=False)


def test_every_documented_finetune_command_matches_the_cli():
    commands = documented_commands()
    problems = problems_of(commands)
    assert not problems, f"{len(problems)} documented command(s) disagree with the CLI:\n" + "\n".join(problems)


def test_the_front_page_tours_every_verb_and_the_docs_show_many_commands():
    readme = {c.verb for c in documented_commands([ROOT / "README.md"]) if not parse(c)}
    assert readme == set(verbs()), f"README's tour lacks {sorted(set(verbs()) - readme)}"
    assert len(documented_commands()) >= 60


def test_the_parser_reads_shell_the_way_a_shell_does(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "text `finetune not-in-a-block`\n"
        "```bash\n"
        "finetune train recipes/quickstart.yaml \\\n"
        "    training.max_steps=2   # a comment\n"
        "printf 'hi' | .venv/bin/finetune chat $(ls -d runs/x/checkpoint-* | tail -1) --prompt \"a # b\" > out.txt\n"
        "torchrun --nproc_per_node 2 -m finetune train recipes/quickstart.yaml && finetune verify \"$RUN\"\n"
        "FINETUNE_CPU_DTYPE=bfloat16 finetune plan recipes/quickstart.yaml; make test\n"
        "# finetune merge commented out\n"
        "```\n"
        "```python\nfinetune = 1\n```\n"
        "```yaml\nfinetune: x\n```\n")
    got = [(c.where.split(":")[-1], c.argv) for c in documented_commands([page])]
    assert got == [
        ("3", ["train", "recipes/quickstart.yaml", "training.max_steps=2"]),
        ("5", ["chat", PLACEHOLDER, "--prompt", "a # b"]),
        ("6", ["train", "recipes/quickstart.yaml"]),
        ("6", ["verify", PLACEHOLDER]),
        ("7", ["plan", "recipes/quickstart.yaml"]),
    ]


def test_a_renamed_key_or_option_or_a_bad_value_is_caught(tmp_path):
    """What a drift looks like: each line below is refused with the reason (and the good one is not)."""
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\n"
        "finetune train recipes/quickstart.yaml training.max_steps=2 --resume\n"
        "finetune train recipes/quickstart.yaml training.max_step=2\n"
        "finetune sweep recipes/quickstart.yaml lora.rank=4,8\n"
        "finetune export runs/x/checkpoint-final --out x.gguf --type q5_k\n"
        "finetune eval recipes/quickstart.yaml --generate-n 4\n"
        "finetune plan recipes/no_such.yaml\n"
        "finetune fit recipes/quickstart.yaml\n"
        "```\n")
    problems = problems_of(documented_commands([page]))
    assert len(problems) == 6 and not any(":2:" in p for p in problems), "\n".join(problems)
    expected = ["unknown key 'training.max_step'", "unknown key 'lora.rank'", "--type q5_k",
                "has no option --generate-n", "recipes/no_such.yaml does not exist", "`finetune fit` is no verb"]
    for p, e in zip(problems, expected):
        assert e in p, p


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_the_docs_point_to_files_and_headings():
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path = page.parent / target if target else page
            if not path.exists():
                broken.append(f"{shown(page)}: {target} does not exist")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{shown(page)}: {target}#{anchor}: no such heading in {shown(path)}")
    assert not broken, broken
