"""Property-based fuzzing (Hypothesis) of everything a user types or feeds: recipes (structure and raw text),
`key=value` overrides, data files of every format, chat templates.

The property, through the real CLI (`finetune validate`, `finetune prepare`): the command exits 0 or 2, never
with a traceback, and a 2 names the culprit: the recipe or data file, or a recipe key (data.max_length, ...).

Each property runs FINETUNE_FUZZ_FAST examples (default 60; data files 2/3 and templates 1/2 of it) in the default
suite (derandomized: the same inputs every run, so a failure reproduces) and FINETUNE_FUZZ_EXAMPLES (default 3000) under `-m slow` (`make test-fuzz`). Every bug the fuzzing
found is pinned as a fixed case in test_found_by_fuzzing, with the message it must give now.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
FAST = int(os.environ.get("FINETUNE_FUZZ_FAST", "60"))  # CI can afford more: FINETUNE_FUZZ_FAST=300
SLOW = int(os.environ.get("FINETUNE_FUZZ_EXAMPLES", "3000"))
KEY = re.compile(r"\b(model|data|training|lora|quantization|dpo|orpo|grpo|rewards|name|output_dir)\b")
COUNTS: dict[str, dict[int, int]] = {}  # property -> exit code -> examples (printed by the slow run)


def fuzz(strategy, share: float = 1.0):
    """Two tests of one property: FAST x `share` derandomized examples in the default suite, SLOW under -m slow."""
    fast = max(1, round(FAST * share))

    def make(body):
        common = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
        quick = settings(max_examples=fast, **common)(given(strategy)(body))
        long = pytest.mark.slow(settings(max_examples=SLOW, **common)(given(strategy)(body)))
        return quick, long
    return make


def invoke(args: list[str], culprits: list[str], prop: str):
    """Run the CLI in-process; assert exit 0 or 2, no traceback, and a 2 that names a culprit or a recipe key."""
    result = runner.invoke(app, args)
    COUNTS.setdefault(prop, {}).setdefault(result.exit_code, 0)
    COUNTS[prop][result.exit_code] += 1
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, f"{args!r} raised {result.exception!r}\n{result.output[-2000:]}"
    assert result.exit_code in (0, 2), f"{args!r} exited {result.exit_code}\n{result.output[-2000:]}"
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        named = any(c in result.output for c in culprits) or KEY.search(result.output)
        assert named, f"exit 2 names neither {culprits} nor a recipe key:\n{result.output[-2000:]}"
    return result


# ------------------------------------------------------------------ recipes


@pytest.fixture(scope="module")
def place(tmp_path_factory, tiny_tokenizer_dir):
    """A directory with a data file and the tiny tokenizer (a model directory validate accepts)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 4)
    return {"root": root, "model": str(tiny_tokenizer_dir), "train": str(root / "train.jsonl")}


def shipped(place, index: int) -> dict:
    """A shipped recipe, pointed at local files (the model and data it names may not exist here)."""
    data = yaml.safe_load(RECIPES[index % len(RECIPES)].read_text())
    data["model"]["name_or_path"] = place["model"]
    data["data"].pop("datasets", None)
    data["data"]["train"] = place["train"]
    data["data"].pop("eval", None)
    data["output_dir"] = str(place["root"] / "run")
    return data


def key_paths(node, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += key_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += key_paths(v, prefix + (i,))
    return out


SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats() | st.text(max_size=30) | st.sampled_from(["", " ", "~", "1e400", "-0", "0x1F", "nan", ".inf",
                                                                    "[bold]x[/]", "a\u2028b", "../../x", "a" * 300,
                                                                    "/", "auto", "all-linear"]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)


@st.composite
def mutated_recipe(draw):
    """(index of a shipped recipe, list of mutations): set a key to a value, delete it, misspell it, nest it."""
    index = draw(st.integers(0, len(RECIPES) - 1))
    ops = draw(st.lists(st.tuples(st.sampled_from(["set", "delete", "misspell", "unknown", "nest"]),
                                  st.integers(0, 10_000), VALUES), min_size=1, max_size=3))
    return index, ops


def apply(data: dict, ops) -> dict:
    for op, pick, value in ops:
        paths = key_paths(data)
        if not paths:
            return data
        path = paths[pick % len(paths)]
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        last = path[-1]
        if op == "set":
            parent[last] = value
        elif op == "delete":
            del parent[last]
        elif op == "misspell" and isinstance(last, str) and last:
            parent[last[:-1] + chr((ord(last[-1]) + 1) % 0x2FF or 65)] = parent.pop(last)
        elif op == "unknown" and isinstance(parent, dict):
            parent[f"x{pick}"] = value
        elif op == "nest":
            for _ in range(pick % 80):
                value = [value] if pick % 2 else {"k": value}
            parent[last] = value
    return data


def recipe_structure(place, case):
    index, ops = case
    data = apply(shipped(place, index), ops)
    path = place["root"] / "r.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    invoke(["validate", str(path)], [str(path)], "recipe structure")


test_recipe_structure, test_recipe_structure_slow = fuzz(mutated_recipe())(recipe_structure)

SNIPPETS = [b"&a ", b"*a", b"<<: *a\n", b"!!python/object:os.system ", b"!!binary ", b"? ", b"- ", b": ", b"[", b"{",
            b"]", b"}", b"\t", b"\xff", b"\xef\xbb\xbf", b"%YAML 1.1\n", b"---\n", b"...\n", b"\r\n", b"\\ud800", b"\"",
            b"'", b"#", b"|\n", b">-\n", b"\x00", b"9" * 5000, b"[" * 3000, b"&a [x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a]\n"]


@st.composite
def mutated_text(draw):
    """A shipped recipe's text with byte edits: YAML syntax pieces inserted, ranges deleted or duplicated."""
    index = draw(st.integers(0, len(RECIPES) - 1))
    edits = draw(st.lists(st.tuples(st.sampled_from(["insert", "snippet", "delete", "repeat"]), st.integers(0, 10**6),
                                    st.integers(1, 40), st.binary(max_size=8), st.sampled_from(SNIPPETS)),
                          min_size=1, max_size=4))
    return index, edits


def recipe_text(place, case):
    index, edits = case
    text = yaml.safe_dump(shipped(place, index), sort_keys=False).encode()
    for op, at, size, blob, snippet in edits:
        at %= len(text) + 1
        text = (text[:at] + blob + text[at:] if op == "insert" else text[:at] + snippet + text[at:] if op == "snippet"
                else text[:at] + text[at + size:] if op == "delete" else text[:at] + text[at:at + size] * 3 + text[at:])
    path = place["root"] / "t.yaml"
    path.write_bytes(text)
    invoke(["validate", str(path)], [str(path)], "recipe text")


test_recipe_text, test_recipe_text_slow = fuzz(mutated_text())(recipe_text)

ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)  # lone surrogates included


@st.composite
def overrides(draw):
    """key=value items: real key paths with random YAML values, misspelt or random keys, random text."""
    data = yaml.safe_load(RECIPES[0].read_text())
    paths = [".".join(map(str, p)) for p in key_paths(data) if all(isinstance(k, str) for k in p)]
    item = st.one_of(
        st.tuples(st.sampled_from(paths), VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))
        .map("=".join),
        st.tuples(st.sampled_from(paths), ANY_TEXT).map("=".join),
        st.tuples(ANY_TEXT, ANY_TEXT).map("=".join),
        ANY_TEXT,
        st.sampled_from(["training.max_steps=" + "9" * 5000, "data.train=" + "[" * 3000, "a..b=1", "=", ".=2",
                         "training.seed=-1", "name=\udcff", "model=[]", "lora.r=&a [*a]"]),
    )
    return draw(st.lists(item, min_size=1, max_size=3))


def override_items(place, items):
    path = place["root"] / "o.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(shipped(place, 0), sort_keys=False))
    invoke(["validate", str(path), *items], [str(path), "override"], "overrides")


test_overrides, test_overrides_slow = fuzz(overrides())(override_items)


# ------------------------------------------------------------------ data files

FIELDS = ["instruction", "input", "output", "prompt", "completion", "text", "messages", "conversations", "chosen",
          "rejected", "role", "content", "from", "value", "x"]
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\u2028", "\r\n", "\ufeff", "<|im_end|>", "[bold]",
                                                         "{{ x }}", "\x1b[31m", "a" * 3000, "\\ud800"]))
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "gpt", "human",
                                                                       "tool", "x"]) | TEXT,
                                              "from": st.sampled_from(["human", "gpt", "x"]), "content": TEXT,
                                              "value": TEXT})
FIELD_VALUE = st.one_of(TEXT, st.lists(MESSAGE, max_size=4), SCALARS, st.lists(SCALARS, max_size=2))
RECORD = st.one_of(st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUE, max_size=5), SCALARS)


WORDS = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30) | st.sampled_from(["hi", "a b", "Blue."])
SHAPES = {
    "alpaca": st.fixed_dictionaries({"instruction": WORDS, "output": WORDS}, optional={"input": TEXT}),
    "completion": st.fixed_dictionaries({"prompt": WORDS, "completion": WORDS}),
    "text": st.fixed_dictionaries({"text": WORDS}),
    "chat": st.fixed_dictionaries({"messages": st.tuples(WORDS, WORDS).map(
        lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}])}),
    "sharegpt": st.fixed_dictionaries({"conversations": st.tuples(WORDS, WORDS).map(
        lambda t: [{"from": "human", "value": t[0]}, {"from": "gpt", "value": t[1]}])}),
}


@st.composite
def data_file(draw):
    """(extension, bytes, data.format, on_bad_record, max_length): records of the format (most of them well
    formed, some random), written as .jsonl/.json/.csv/.parquet with random line ends, BOMs and truncation."""
    fmt = draw(st.sampled_from(sorted(SHAPES)))
    records = draw(st.lists(SHAPES[fmt] | RECORD if draw(st.booleans()) else SHAPES[fmt], min_size=0, max_size=6))
    ext = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    bom = draw(st.booleans())
    if ext == ".jsonl":
        body = newline.join(json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records).encode()
        body += draw(st.sampled_from([b"", b"", b"", b"\n", b"{broken\n", b"[" * 2000 + b"\n", b"\xff\n", b'{"a": 1' + b"0" * 5000 + b"}"]))
    elif ext == ".json":
        body = json.dumps(records, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1]))).encode()
        body = body[: draw(st.integers(0, len(body)))] if draw(st.integers(0, 3)) == 0 and body else body
    elif ext == ".csv":
        out = io.StringIO()
        rows = [r for r in records if isinstance(r, dict)]
        cols = sorted({k for r in rows for k in r}) or ["instruction"]
        writer = csv.DictWriter(out, cols, lineterminator=newline)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
        body = out.getvalue().encode("utf-8", "surrogatepass")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [r for r in records if isinstance(r, dict)]
        try:
            table = pa.Table.from_pylist(rows or [{"x": 1}])
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            table = pa.table({"instruction": ["a"]})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        body = sink.getvalue()
        if draw(st.integers(0, 3)) == 0:
            body = body[: draw(st.integers(0, len(body)))]
    if bom and ext != ".parquet":
        body = b"\xef\xbb\xbf" + body
    return ext, body, fmt, draw(st.sampled_from(["error", "skip"])), draw(st.sampled_from([8, 64, 1024]))


def data_records(place, case):
    ext, body, fmt, on_bad, max_length = case
    data = place["root"] / f"d{ext}"
    data.write_bytes(body)
    recipe = place["root"] / "d.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": place["model"]}, "output_dir": str(place["root"] / "drun"),
        "data": {"train": str(data), "format": fmt, "on_bad_record": on_bad, "max_length": max_length},
    }))
    invoke(["prepare", str(recipe)], [str(data), str(recipe)], "data files")


test_data_files, test_data_files_slow = fuzz(data_file(), share=2 / 3)(data_records)

JINJA = ["{{ ", " }}", "{% ", " %}", "for m in messages", "endfor", "if ", "endif", "m['content']", "m.role",
         "messages[0]", "raise_exception('no')", "1/0", "bos_token", "eos_token", "'<|im_end|>'", "|trim", "|upper",
         "add_generation_prompt", "x", "(", ")", "\n", "namespace(a=1)", "range(10**9)", "messages.__class__"]


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_template(place, edits):
    """ChatML with Jinja pieces inserted at random places (or nothing else: the plain template must pass)."""
    template = CHATML
    for at, piece in edits:
        at %= len(template) + 1
        template = template[:at] + piece + template[at:]
    recipe = place["root"] / "c.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": place["model"]}, "output_dir": str(place["root"] / "crun"),
        "data": {"train": place["train"], "template": template},
    }))
    invoke(["prepare", str(recipe)], [str(recipe), place["train"]], "chat templates")


EDITS = st.lists(st.tuples(st.integers(0, 10**4), st.sampled_from(JINJA)), max_size=3)
test_chat_templates, test_chat_templates_slow = fuzz(EDITS, share=1 / 2)(chat_template)


@pytest.mark.slow
def test_print_fuzz_counts():
    """Runs last in the slow module: the examples per property and exit code, for docs/reliability.md."""
    for prop, codes in COUNTS.items():
        print(f"fuzz {prop}: {sum(codes.values())} examples, exit codes {dict(sorted(codes.items()))}")


# ------------------------------------------------------------------ the bugs fuzzing found, pinned

BASE = "model:\n  name_or_path: {model}\ndata:\n  train: {train}\n"
FOUND = [  # (what crashed before, recipe bytes or None, data file bytes or None, CLI args after the recipe, message)
    ("non-UTF-8 recipe: UnicodeDecodeError", BASE.encode() + b"  x: \xff\n", None, [], "r.yaml:5: not UTF-8 text"),
    ("5000-digit integer: ValueError from int()", (BASE + "training:\n  max_steps: " + "9" * 5000 + "\n").encode(),
     None, [], "r.yaml:6: the integer 99999999999999999999... (5000 characters) does not fit in 64 bits"),
    ("alias bomb: billions of values", BASE.encode() + b"x: &a [1,1,1,1,1,1,1,1,1,1]\n" + b"".join(
        f"y{i}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n".encode() for i in range(8)), None, [],
     "more than 100,000 values once its YAML aliases are expanded"),
    ("recursive alias", BASE.encode() + b"training: &a {seed: *a}\n", None, [], "refers to a value that contains it"),
    ("5000 nested lists: RecursionError", BASE.encode() + b"x: " + b"[" * 5000 + b"]" * 5000 + b"\n", None, [],
     "r.yaml: not valid YAML (nested deeper than this parser can follow)"),
    ("lone surrogate: UnicodeEncodeError printing", (BASE + 'name: "\\ud800"\n').encode(), None, [],
     "r.yaml:5: text with a lone surrogate"),
    ("300-byte file name: OSError ENAMETOOLONG", (BASE + "output_dir: /tmp/" + "a" * 300 + "\n").encode(), None, [],
     "output_dir: the name 'aaaa"),
    ("NUL in a path", (BASE + 'output_dir: "a\\0b"\n').encode(), None, [], "output_dir: a path cannot contain a NUL"),
    ("negative seed: ValueError in numpy at train", (BASE + "training:\n  seed: -1\n").encode(), None, [],
     "training.seed: Input should be greater than or equal to 0"),
    ("override of 3000 '[': RecursionError", None, None, ["training.max_steps=" + "[" * 3000],
     "training.max_steps: Input should be a valid integer"),
    ("override with undecodable argv bytes", None, None, ["name=\udcff"], "is not valid text"),
    ("override with a self-referencing alias", None, None, ["lora.r=&a [*a]"], "refers to a value that contains it"),
    ("overrides '=' then '.=' (found by the 1000-example run)", None, None, ["=", ".="], "has an empty part"),
    ("JSON line nested 100000 deep: RecursionError", None, b"[" * 100000 + b"]" * 100000 + b"\n", ["prepare"],
     "d.jsonl:1: JSON nested deeper than the reader can follow"),
    ("JSON number of 5000 digits: ValueError", None, b'{"instruction": 1' + b"0" * 5000 + b', "output": "b"}\n',
     ["prepare"], "d.jsonl:1: unreadable JSON number"),
    ("\\ud800 escape in a record: TypeError in the tokenizer", None, b'{"instruction": "\\ud800", "output": "b"}\n',
     ["prepare"], "d.jsonl:1: a string holds a lone surrogate"),
    ("U+2028 inside a JSON string split the line", None,
     json.dumps({"instruction": "a\u2028b", "output": "c"}, ensure_ascii=False).encode() + b"\n"
     + b'{"instruction": 1}\n', ["prepare"], "d.jsonl:2: field 'instruction' must be a string"),
    ("chat template that raises: TemplateError", (BASE + "  template: \"{{ raise_exception('no') }}\"\n").encode(), None,
     ["prepare"], "d.jsonl:1: The chat template (data.template, else the tokenizer's) fails"),
    ("chat template with a syntax error: TemplateSyntaxError", (BASE + "  template: '{{ foo( }}'\n").encode(), None,
     ["prepare"], "TemplateSyntaxError: unexpected '}'"),
]


@pytest.mark.parametrize("what,recipe,data,args,message", FOUND, ids=[f[0][:40] for f in FOUND])
def test_found_by_fuzzing(tmp_path, tiny_tokenizer_dir, what, recipe, data, args, message):
    """Each crash fuzzing found: now exit 2 with this message (naming file:line or key), no traceback."""
    train = tmp_path / "d.jsonl"
    train.write_bytes(data if data is not None else b'{"instruction": "a", "output": "b"}\n')
    path = tmp_path / "r.yaml"
    path.write_bytes((recipe or BASE.encode()).replace(b"{model}", str(tiny_tokenizer_dir).encode())
                     .replace(b"{train}", str(train).encode()))
    verb = args[:1] if args[:1] == ["prepare"] else ["validate"]
    extra = args[1:] if verb == ["prepare"] else args
    result = runner.invoke(app, [*verb, str(path), *extra, *([f"output_dir={tmp_path / 'run'}"] if verb == ["prepare"]
                                                                else [])])
    assert result.exit_code == 2, (what, result.output, result.exception)
    assert message in result.output, (what, result.output)
    assert "Traceback" not in result.output
