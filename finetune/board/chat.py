"""The chat panel: a checkpoint's reply, streamed piece by piece, through `finetune chat`'s own code.

`load_session` loads the checkpoint as `finetune chat CHECKPOINT` does (its recipe's base and quantization, its
tokenizer's chat template) and `reply(..., stream=...)` generates with chat's streamer, so with temperature 0
the streamed text is `finetune chat CHECKPOINT --prompt TEXT`'s reply. "base" answers with the adapter
disabled (chat's /base). Loaded sessions are kept (the last few), one generation at a time each.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from pathlib import Path

KEEP = 3  # sessions kept loaded


class Chats:
    def __init__(self):
        self.sessions: OrderedDict[str, tuple] = OrderedDict()
        self.guard = threading.Lock()

    def session(self, checkpoint: Path):
        """The loaded session of `checkpoint` and its lock (loading it on first use)."""
        from finetune.generate import load_session

        key = str(checkpoint)
        with self.guard:
            if key not in self.sessions:
                self.sessions[key] = (load_session(key), threading.Lock())
                while len(self.sessions) > KEEP:
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(key)
            return self.sessions[key]

    def answer(self, checkpoint: Path, history: list[dict], prompt: str, options, base: bool, write) -> str:
        """The reply to `prompt` after `history` (user/assistant/system turns); `write(piece)` gets it streamed."""
        from finetune.generate import reply

        session, lock = self.session(checkpoint)
        with lock:
            session.messages = [dict(role=m["role"], content=m["content"]) for m in history]
            session.active = None if base else next(iter(session.adapters), None)
            return reply(session, prompt, options, stream=write)

    async def stream(self, checkpoint: Path, history: list[dict], prompt: str, options, base: bool):
        """Async iterator of reply pieces (generation runs in a worker thread); an error ends it with
        {"error": message}."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work():
            try:
                self.answer(checkpoint, history, prompt, options, base,
                            lambda piece: loop.call_soon_threadsafe(queue.put_nowait, {"text": piece}))
                loop.call_soon_threadsafe(queue.put_nowait, {"done": True})
            except Exception as e:  # shown in the panel: e.g. a damaged adapter, a missing base model
                loop.call_soon_threadsafe(queue.put_nowait, {"error": f"{type(e).__name__}: {e}"})

        threading.Thread(target=work, daemon=True).start()
        while True:
            item = await queue.get()
            yield item
            if "text" not in item:
                return
