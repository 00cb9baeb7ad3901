"""`finetune chat` on the 2-layer Llama: one-shot greedy replies equal eval's generations, named adapters switch
without a reload and answer like each adapter loaded alone, and the checkpoint's chat template is the one used."""

import json

import pytest
from conftest import write_jsonl
from test_merge import make_adapter
from transformers import AutoTokenizer
from typer.testing import CliRunner

from finetune.chat import ChatOptions, Session, load_session, prompt_ids, reply
from finetune.cli import app
from finetune.model import load_base_model
from finetune.recipe import QuantizationSection

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
    base = Session(load_base_model(path, QuantizationSection(), "cpu").eval(), both.tok, path)
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
