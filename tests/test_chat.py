"""`finetune chat` on the 2-layer Llama: one-shot greedy replies equal eval's generations, named adapters switch
without a reload and answer like each adapter loaded alone, and the checkpoint's chat template is the one used."""

import json

import pytest
from conftest import load_base, write_jsonl
from test_merge import make_adapter
from transformers import AutoTokenizer
from typer.testing import CliRunner

from finetune.generate.session import ChatOptions, Session, load_session, prompt_ids, reply
from finetune.cli import app
from finetune.recipe.schema import QuantizationSection

runner = CliRunner()
OPTIONS = ChatOptions(max_new_tokens=12)
PROMPT = "Repeat the word twice."


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("chat_adapters")
    return [make_adapter(root / "one", tiny_model_dir, seed=0), make_adapter(root / "two", tiny_model_dir, seed=1)]


def test_one_shot_greedy_reply_equals_evals_generation(adapters, tmp_path):
    data = tmp_path / "one.jsonl"
    write_jsonl(data, [{"prompt": PROMPT, "completion": "cat cat"}])
    samples = tmp_path / "samples.jsonl"
    result = runner.invoke(app, ["eval", "--model", str(json.loads((adapters[0] / "adapter_config.json").read_text())
                                                         ["base_model_name_or_path"]),
                                 "--adapter", str(adapters[0]), "--data", str(data), "--generate", "1",
                                 "--max-new-tokens", "12", "--samples", str(samples)])
    assert result.exit_code == 0, result.output
    expected = json.loads(samples.read_text())["prediction"]
    # the checkpoint as positional argument: base model and quantization from its recipe.yaml
    result = runner.invoke(app, ["chat", str(adapters[0]), "--prompt", PROMPT, "--max-new-tokens", "12",
                                 "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    assert expected  # the random adapter says something


def test_adapters_switch_and_answer_like_each_alone(adapters):
    both = load_session(str(adapters[0]), adapters=[str(adapters[1])])
    assert list(both.adapters) == ["one", "two"] and both.active == "one"
    base_model = both.model.get_base_model()
    answers = {}
    for label in ["one", "two", None, "one"]:
        both.active = label
        both.messages = []
        answers.setdefault(label, []).append(reply(both, PROMPT, OPTIONS))
    assert both.model.get_base_model() is base_model  # switching loaded nothing new
    assert answers["one"][0] == answers["one"][1]
    for i, label in enumerate(["one", "two"]):
        alone = load_session(str(adapters[i]))
        assert reply(alone, PROMPT, OPTIONS) == answers[label][0]
    assert answers["one"][0] != answers["two"][0]
    # /base: the 4-bit base the adapters sit on, without them
    path = json.loads((adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = Session(load_base(path, QuantizationSection(), "cpu").eval(), both.tok, path)
    assert reply(base, PROMPT, OPTIONS) == answers[None][0]


def test_the_checkpoints_chat_template_is_used(tiny_model_dir, tmp_path):
    ckpt = make_adapter(tmp_path / "ckpt", tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok.save_pretrained(ckpt)
    session = load_session(str(ckpt))
    session.messages = [{"role": "system", "content": "Be terse."}]
    text = session.tok.decode(prompt_ids(session, "hi"))
    assert text == "[system] Be terse.\n[user] hi\n[assistant] "
    session.messages += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert session.tok.decode(prompt_ids(session, "again")) == (
        "[system] Be terse.\n[user] hi\n[assistant] yo\n[user] again\n[assistant] ")


def test_interactive_commands_and_stdin(adapters):
    # stdin that is not a terminal is the one prompt
    result = runner.invoke(app, ["chat", str(adapters[0]), "--max-new-tokens", "12"], input=PROMPT + "\n")
    alone = load_session(str(adapters[0]))
    assert result.exit_code == 0 and result.stdout == reply(alone, PROMPT, OPTIONS) + "\n"


def test_interactive_session_streams_switches_and_survives_ctrl_c(adapters, monkeypatch, capsys):
    from finetune.generate import session as chat_module

    session = load_session(str(adapters[0]), adapters=[str(adapters[1])])
    expected = {label: reply(load_session(str(adapters[i])), PROMPT, OPTIONS)
                for i, label in enumerate(["one", "two"])}
    terse = load_session(str(adapters[0]))
    terse.messages = [{"role": "system", "content": "Be terse."}]
    expected["terse"] = reply(terse, PROMPT, OPTIONS)
    session.messages = []
    lines = iter(["/adapter two", PROMPT, "/reset", "/adapter nope", "/system Be terse.", "/adapter one", PROMPT,
                  "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    chat_module._interactive(session, OPTIONS, None)
    out = capsys.readouterr()
    assert [line.rstrip() for line in out.out.splitlines()] == [expected["two"], expected["terse"]]
    assert "no adapter 'nope'; loaded: one, two" in out.err
    assert session.active == "one" and session.messages[0] == {"role": "system", "content": "Be terse."}
    assert next(lines) == "never read"

    # Ctrl-C in the middle of a reply stops that reply only; Ctrl-D ends the session
    pieces = []

    def interrupt_after_first_piece(piece):
        pieces.append(piece)
        if len(pieces) == 2:  # the second streamed piece: Ctrl-C
            raise KeyboardInterrupt
        return len(piece)

    session.messages = []
    lines = iter([PROMPT])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", read)
    monkeypatch.setattr(chat_module.sys.stdout, "write", interrupt_after_first_piece)
    chat_module._interactive(session, OPTIONS, None)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "stopped: " in err
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    partial = "".join(pieces).strip()  # the tokens generated before Ctrl-C
    assert session.messages[1]["content"] == partial and expected["one"].startswith(partial)
    assert len(partial) < len(expected["one"])


def test_int8_decode_weights_through_the_cli_and_a_bad_value_refused(adapters, monkeypatch, caplog):
    """FINETUNE_DECODE_WEIGHTS=int8 on `finetune chat`: a reply, with the log naming int8 (the decision forced: on
    this CPU the probe may keep the exact weights); int9 refused with exit 2, naming the variable, no traceback."""
    from finetune.generate import lean

    monkeypatch.setattr(lean, "int8_rows", lambda dtype, bar: 8)
    lean._note.cache_clear()
    monkeypatch.setenv("FINETUNE_DECODE_WEIGHTS", "int8")
    with caplog.at_level("WARNING", logger="finetune.generate"):
        result = runner.invoke(app, ["chat", str(adapters[0]), "--prompt", PROMPT, "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and "decoding with int8 weights" in caplog.text
    monkeypatch.setenv("FINETUNE_DECODE_WEIGHTS", "int9")
    result = runner.invoke(app, ["chat", str(adapters[0]), "--prompt", PROMPT, "--max-new-tokens", "6"])
    assert result.exit_code == 2 and "FINETUNE_DECODE_WEIGHTS='int9': expected 'exact'" in result.output
    assert "Traceback" not in result.output
