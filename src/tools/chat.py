"""`slm chat CHECKPOINT`: talk to a model in the terminal.

    slm chat data/models/chat_tiny_final.pt
    echo "What does os.path.join do?" | slm chat data/models/chat_tiny_final.pt

Replies stream as they are made. The conversation stays in the model's KV cache, so each turn
costs only its own tokens; when the history outgrows block_size, the oldest turns are dropped
(with a notice) and the rest is read again. Commands: /reset, /system TEXT, /temperature X,
/top_k N, /top_p X, /help, /quit. When standard input is not a terminal, each line is one user
turn, each reply is printed on its own line(s), and the command exits 0 at the end of input.

A base model (no chat tokens: not fine-tuned with data.format: chat) is used as plain completion:
each line is continued as a prompt, with a notice. The format is src/data/chat.py's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from src.data.chat import generation_prompt, render, turn
from src.errors import SLMError
from src.model.gpt import KVCache, Sampling, sample_next
from src.validate import field_value

HELP = """commands:
  /reset             forget the conversation (the system message stays)
  /system TEXT       set the system message (and start over); /system alone removes it
  /temperature X     sampling temperature (0 = always the likeliest token)
  /top_k N           sample among the N likeliest tokens (0 = all)
  /top_p X           sample among the likeliest tokens holding probability X (1 = all)
  /help              this list
  /quit              leave (also Ctrl-D)"""


class Chat:
    """A conversation with a chat model, kept in a KV cache across turns."""

    def __init__(self, model, tok, system: str | None = None, temperature=0.7, top_k=50,
                 top_p=None, max_new_tokens=256, seed=None, notice=print):
        self.model, self.tok, self.notice = model, tok, notice
        self.dev = next(model.parameters()).device
        self.size = model.cfg.block_size
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.max_new = max(1, min(max_new_tokens, self.size // 2))
        self.gen = torch.Generator(device=self.dev)
        self.gen.manual_seed(seed if seed is not None else torch.seed())
        self.system = system
        self.stops = {tok.eot_id, *(tok.chat_ids or ())}
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = KVCache(self.model.cfg, 1, self.size, self.dev)
        self.cached: list[int] = []  # the tokens the cache holds

    @torch.no_grad()
    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run ids after the cached tokens; the logits of the last position."""
        x = torch.tensor([ids], device=self.dev)
        logits, _ = self.model(x, cache=self.cache)
        self.cached += ids
        return logits[0, -1:, : self.tok.vocab_size].float()

    def _fit(self, new: list[int]) -> list[int]:
        """The tokens to feed for this turn: new after the cache, or the whole (shortened)
        history re-read when the cache has no room for it and a reply."""
        fresh = not self.cached
        if fresh:  # the conversation so far (the system message after a reset) opens the cache
            new = render(self.tok, self.messages)[0] + new
        need = min(self.max_new, self.size // 4)  # room a reply must have at least
        if len(self.cached) + len(new) + need <= self.size:
            return new
        new = new[len(render(self.tok, self.messages)[0]):] if fresh else new
        dropped = 0
        while True:
            ids = render(self.tok, self.messages)[0] + new
            if len(ids) + need <= self.size:
                break
            i = next((k for k, m in enumerate(self.messages) if m["role"] != "system"), None)
            if i is None:
                raise SLMError(f"the message is too long for this model's {self.size}-token "
                               "context; shorten it")
            del self.messages[i]
            dropped += 1
        self.notice(f"(the conversation outgrew the model's {self.size}-token context: dropped "
                    f"the {dropped} oldest message(s))")
        self.cache.pos, self.cached = 0, []
        return ids

    @torch.no_grad()
    def reply(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> str:
        """The model's answer to one user message (streamed to on_text piece by piece)."""
        new = turn(self.tok, "user", text)[0] + generation_prompt(self.tok)
        logits = self._feed(self._fit(new))
        out, shown = [], 0
        for _ in range(min(self.max_new, self.size - len(self.cached))):
            t = int(sample_next(logits, self.temperature, self.top_k or None, self.top_p,
                                self.gen))
            if t in self.stops:
                break
            out.append(t)
            s = self.tok.decode(out)
            end = len(s.rstrip("\ufffd"))
            if end > shown:
                on_text(s[shown:end])
                shown = end
            logits = self._feed([t])
        answer = self.tok.decode(out)
        if len(answer) > shown:
            on_text(answer[shown:])
        self.messages += [{"role": "user", "content": text},
                          {"role": "assistant", "content": answer}]
        close = [self.tok.chat_ids[1], *self.tok.encode("\n")]  # as the template ends a turn
        room = self.size - len(self.cached)
        if room > 0:
            self._feed(close[:room])
        return answer


def command(chat: Chat, line: str, say) -> bool:
    """Apply a /command; False when it asks to quit."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    try:
        if name in ("quit", "exit", "q"):
            return False
        if name == "reset":
            chat.reset()
            say("(conversation reset)")
        elif name == "system":
            chat.system = arg or None
            chat.reset()
            say(f"(system message {'set' if arg else 'removed'}; conversation reset)")
        elif name in ("temperature", "temp"):
            chat.temperature = field_value(Sampling, "temperature", arg, f"/{name}")
        elif name in ("top_k", "top-k"):
            chat.top_k = field_value(Sampling, "top_k", arg, f"/{name}")
        elif name in ("top_p", "top-p"):
            p = field_value(Sampling, "top_p", arg, f"/{name}")
            chat.top_p = p if p < 1 else None
        elif name == "help":
            say(HELP)
        else:
            say(f"unknown command /{name}; /help lists them")
    except SLMError as e:  # the same ranges as the command-line flags
        say(f"{e}; e.g. /{name} 0.7")
    return True


def run(checkpoint, device="auto", system=None, temperature=0.7, top_k=50, top_p=None,
        max_new_tokens=256, seed=None, stdin=None, out=None, err=None) -> int:
    """`slm chat`: interactive on a terminal, one turn per line otherwise."""
    from src.checkpoint import load_model
    from src.hardware import resolve_device

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    model, tok, _ = load_model(checkpoint, resolve_device(device))
    interactive = stdin.isatty()
    say = lambda s: print(s, file=err if not interactive else out, flush=True)  # noqa: E731
    if tok.chat_ids is None:
        say("notice: this is a base model (no chat tokens: not fine-tuned with data.format: "
            "chat); each line is continued as plain text")
        return _complete_lines(model, tok, stdin, out, temperature, top_k, top_p,
                               max_new_tokens, seed, interactive)
    chat = Chat(model, tok, system, temperature, top_k, top_p, max_new_tokens, seed, say)
    if interactive:
        say(f"chatting with {checkpoint} ({model.cfg.block_size}-token context); /help for "
            "commands, /quit to leave")
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print(file=out)
                return 0
        else:
            line = stdin.readline()
            if not line:
                return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not command(chat, line, say):
                return 0
            continue
        if interactive:
            print("model> ", end="", file=out, flush=True)
        try:
            chat.reply(line, lambda s: print(s, end="", file=out, flush=True))
        except SLMError as e:  # a message longer than the context: say so, keep chatting
            say(f"error: {e}")
        print(file=out, flush=True)


def _complete_lines(model, tok, stdin, out, temperature, top_k, top_p, max_new_tokens, seed,
                    interactive) -> int:
    from src.model.generate import complete

    while True:
        try:
            line = input("prompt> ") if interactive else stdin.readline()
        except EOFError:
            return 0
        if not line and not interactive:
            return 0
        line = line.rstrip("\n")
        if line in ("/quit", "/exit"):
            return 0
        complete(model, tok, [line], max_new_tokens, temperature, top_k, top_p, seed,
                 on_text=lambda r, s: print(s, end="", file=out, flush=True))
        print(file=out, flush=True)
