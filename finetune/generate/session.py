"""`finetune chat`: talk to a base model, an adapter checkpoint, a merged directory or a GGUF file.

The model is loaded the way `finetune eval` loads it (4-bit base + adapters as trained, a directory, or a
dequantized GGUF), the prompt is rendered with the checkpoint's (else the model's) chat template the way
the data pipeline renders prompts, and generation goes through `generate_ids`, the decoding path of `finetune eval
--generate`: with temperature 0 a one-shot reply is exactly what eval produces for the same prompt.

Several adapters load onto one base as PEFT named adapters; `/adapter NAME` switches between them (no
reload) and `/base` answers with adapters disabled. Interactive replies stream token by token; Ctrl-C
stops the current reply, Ctrl-D (or /exit) ends the session.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.errors import ModelError

HELP = "/reset  /system TEXT  /adapter NAME  /base  /exit   (Ctrl-C stops a reply, Ctrl-D quits)"


@dataclass
class ChatOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    system: str | None = None


@dataclass
class Session:
    model: object
    tok: object
    source: str
    adapters: dict[str, str] = field(default_factory=dict)  # label -> PEFT adapter name
    active: str | None = None  # label of the active adapter; None: the base
    messages: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.active or "base"


def chat(target: str | None = None, *, model: str | None = None, adapters: list[str] | tuple = (),
         overrides: list[str] | None = None, prompt: str | None = None, options: ChatOptions | None = None,
         console=None) -> str | None:
    """With `prompt`: the one reply to it. Without: an interactive session on the terminal (returns None)."""
    options = options or ChatOptions()
    for name, text in (("--prompt", prompt), ("--system", options.system)):
        if text is not None and not _is_text(text):  # undecodable bytes from argv or stdin: no tokenizer takes them
            raise ModelError(f"{name} is not valid UTF-8 text: {ascii(text)[:80]}.")
    session = load_session(target, model=model, adapters=adapters, overrides=overrides)
    if options.system:
        session.messages.append({"role": "system", "content": options.system})
    if prompt is not None:
        return reply(session, prompt, options)
    _interactive(session, options, console)
    return None


def resolve_target(target: str | None, *, model: str | None = None, adapters: list[str] | tuple = (),
                   overrides: list[str] | None = None):
    """What a chat (or `finetune serve`) target names: (recipe or None, the base's ModelSection, adapter dirs).
    A recipe gives its model; an adapter checkpoint goes first among the adapters and gives the base it was
    trained on (its recipe.yaml, else its adapter_config.json); a directory, hub id or .gguf is the base.
    `model` replaces the base. Every adapter directory is checked (manifest) before anything loads."""
    from finetune.model import check_adapter_dir, saved_recipe
    from finetune.recipe import ModelSection

    adapters, recipe, section = [str(a) for a in adapters], None, None
    if target and Path(target).suffix in (".yaml", ".yml"):
        from finetune.recipe import load_recipe

        recipe = load_recipe(Path(target), overrides or [])
        section = recipe.model
    elif target and (Path(target) / "adapter_config.json").is_file():
        adapters.insert(0, target)
        saved = saved_recipe(Path(target)).get("model")
        section = ModelSection.model_validate(saved) if saved else None
    elif target and not Path(target).exists() and (target.startswith((".", "/", "~")) or target.endswith(".gguf")):
        raise ModelError(f"'{target}' does not exist; give a recipe (.yaml), an adapter checkpoint directory, a "
                         "model directory, a .gguf file or a hub id.")
    elif target:
        model = model or target
    for a in adapters:
        check_adapter_dir(a)
    if not model and adapters:  # an adapter trained over a LoftQ base: that base (model/loftq.py)
        from finetune.model import loftq_trained_base

        model = loftq_trained_base(adapters[0])
    if model:
        section = (section or ModelSection(name_or_path=model)).model_copy(update={"name_or_path": model})
    if section is None and adapters:
        from finetune.model import read_adapter_config

        base = read_adapter_config(adapters[0]).get("base_model_name_or_path")
        section = ModelSection(name_or_path=base) if isinstance(base, str) and base else None
    if section is None:
        raise ModelError("Which model? Give a recipe, a checkpoint directory, a model directory or .gguf file, "
                         "or --model.")
    return recipe, section, adapters


def load_session(target: str | None, *, model: str | None = None, adapters: list[str] | tuple = (),
                 overrides: list[str] | None = None) -> Session:
    """Resolve what to load (recipe, checkpoint, model directory or .gguf; --model and --adapter on top) and load it."""
    from finetune.model import adapter_labels, eval_quantization, load_eval_model, load_tokenizer

    recipe, section, adapters = resolve_target(target, model=model, adapters=adapters, overrides=overrides)
    quant = eval_quantization("auto", recipe, section.name_or_path, adapters)
    template = recipe.data.chat_template if recipe else None
    tok = load_tokenizer(adapters[0] if adapters else section.name_or_path, template)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    net = load_eval_model(section, quant, device).eval()
    session = Session(net, tok, section.name_or_path)
    if adapters:
        from finetune.model import load_adapters

        labels = adapter_labels(adapters) if len(adapters) > 1 else [Path(adapters[0]).name]
        net = load_adapters(net, adapters)
        session.model = net.eval()
        session.adapters = {label: f"a{i}" for i, label in enumerate(labels)}
        session.active = labels[0]
        net.set_adapter("a0")
    return session


def prompt_ids(session: Session, user: str) -> list[int]:
    """Token ids of the conversation so far plus `user`, ending where the assistant's reply starts."""
    return render_messages(session.tok, [*session.messages, {"role": "user", "content": user}], session.source)


def render_messages(tok, messages: list[dict], source: str) -> list[int]:
    """Token ids of `messages` (role/content dicts) through `tok`'s chat template, ending where the assistant's
    reply starts. One user turn (after an optional system message) renders exactly as the data pipeline renders a
    training prompt; without a chat template only a single prompt works (as plain completion text)."""
    from finetune.data import Record, prompt_and_reference

    if not tok.chat_template:
        if len(messages) > 1:
            raise ModelError(f"{source}: the tokenizer has no chat template, so only a single prompt "
                             "without a system message works; give a recipe with data.template.")
        rec = Record("completion", {"prompt": messages[0]["content"], "completion": "-"}, "chat")
        return prompt_and_reference(rec, "completion", tok)[0]
    if all(m["role"] != "assistant" for m in messages):  # one turn: exactly how the data pipeline renders it
        rec = Record("chat", {"messages": [*messages, {"role": "assistant", "content": "-"}]}, "chat")
        return prompt_and_reference(rec, "chat", tok)[0]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def reply(session: Session, user: str, options: ChatOptions, stream=None) -> str:
    """The model's reply to `user` (added to the conversation with it); `stream(text)` receives pieces as
    they are generated. Ctrl-C stops the reply early (KeyboardInterrupt is re-raised after recording it)."""
    from finetune.generate.decode import GenerationOptions, generate_ids

    ids = prompt_ids(session, user)
    gen = GenerationOptions(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                            top_p=options.top_p, batch_size=1, seed=options.seed)
    printer = _Streamer(session.tok, stream or (lambda text: None))
    with _adapter_state(session):
        try:
            generate_ids(session.model, session.tok, [ids], gen, stream=printer.put)
            printer.end()
        finally:
            session.messages += [{"role": "user", "content": user},
                                 {"role": "assistant", "content": printer.text().strip()}]
    return printer.text().strip()


class _adapter_state:
    """Generate with the session's adapter active, or with adapters disabled for the base."""

    def __init__(self, session: Session):
        self.session, self.ctx = session, None

    def __enter__(self):
        s = self.session
        if s.adapters and s.active is None:
            self.ctx = s.model.disable_adapter()
            self.ctx.__enter__()
        elif s.adapters:
            s.model.set_adapter(s.adapters[s.active])

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class _Streamer:
    """Decodes the new tokens so far and passes on the text not yet shown."""

    def __init__(self, tok, write):
        self.tok, self.write, self.ids, self.shown = tok, write, [], 0

    def put(self, token: int) -> None:
        self.ids.append(token)
        text = self.text().lstrip()
        if text and not text.endswith("\ufffd"):  # a half multi-byte character waits for the rest
            self.write(text[self.shown:])
            self.shown = len(text)

    def end(self) -> None:  # whatever was held back (a reply may end on an incomplete character)
        text = self.text().lstrip()
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


def _interactive(session: Session, options: ChatOptions, console) -> None:
    """Read-reply loop on the terminal: replies stream to stdout, status lines go to `console` (stderr)."""
    say = (lambda text: console.print(text, highlight=False)) if console else (lambda text: print(text, file=sys.stderr))
    names = ", ".join(session.adapters) or "none"
    say(f"[dim]chatting with {session.source} (adapters: {names}); {HELP}[/]")
    while True:
        try:
            line = input(f"{session.label}> ").encode("utf-8", "replace").decode("utf-8")  # undecodable bytes
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(session, line.strip(), say):
                return
            continue
        _streamed_turn(session, line, options, say)


def _streamed_turn(session: Session, line: str, options: ChatOptions, say) -> None:
    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    started, before = time.perf_counter(), len(session.messages)
    stopped = False
    try:
        text = reply(session, line, options, stream=write)
    except KeyboardInterrupt:
        stopped, text = True, session.messages[-1]["content"] if len(session.messages) > before else ""
    print()
    n = len(session.tok(text, add_special_tokens=False)["input_ids"])
    seconds = time.perf_counter() - started
    say(f"[dim]{'stopped: ' if stopped else ''}{n} tokens, {n / seconds if seconds else 0:.1f} tokens/s "
        f"({session.label})[/]")


def _command(session: Session, line: str, say) -> bool:
    """Handle a /command; True ends the session."""
    word, _, arg = line.partition(" ")
    if word in ("/exit", "/quit"):
        return True
    if word == "/reset":
        session.messages = [m for m in session.messages if m["role"] == "system"]
        say("[dim]conversation cleared[/]")
    elif word == "/system":
        session.messages = [{"role": "system", "content": arg.strip()}] if arg.strip() else []
        say("[dim]system prompt set; conversation cleared[/]")
    elif word == "/base":
        session.active = None
        say("[dim]answering with the base model (adapters disabled)[/]")
    elif word == "/adapter":
        if arg.strip() not in session.adapters:
            say(f"[red]no adapter '{arg.strip()}'; loaded: {', '.join(session.adapters) or 'none'}[/]")
        else:
            session.active = arg.strip()
            say(f"[dim]adapter {session.active} active[/]")
    else:
        say(f"[dim]{HELP}[/]")
    return False


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

