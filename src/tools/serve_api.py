"""OpenAI's API as `slm serve` speaks it: request checks, chat rendering, response objects.

Requests are checked here and turned into token ids and sampling settings for the engine; every
problem becomes an `APIError` that the server sends as OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}`. Fields the server cannot honour (logprobs,
tools, penalties, ...) are refused with a 400 naming them, never silently ignored. Extensions:
`ignore_eos` (keep generating past the end-of-text token, as vLLM names it).

Chat on a base model: `render_chat` writes the conversation as plain text,

    System: <system message>

    User: <message>

    Assistant: <reply>

    User: <message>

    Assistant:

and the reply ends at the model's end-of-text token or a new "\\nUser:" line. A chat fine-tuned
model (its tokenizer has the chat tokens) gets its own template instead: `chat_ids` renders the
messages with src/data/chat.py's `render`, the one place the chat format lives, and the reply
ends at <|im_end|>.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PLAIN_ROLES = {"system": "System", "developer": "System", "user": "User",
               "assistant": "Assistant", "tool": "Tool"}
PLAIN_STOPS = ("\nUser:", "\nSystem:")
DEFAULT_CHAT_TOKENS = 512  # a chat reply's max_tokens when the request names none (and room allows)
MAX_STOPS = 4

# refused when set to anything but "off" (None, False, 0, {}, [] or "text")
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "functions",
               "function_call", "presence_penalty", "frequency_penalty", "response_format",
               "suffix", "audio", "modalities", "prediction", "best_of")


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] = ""
    echo: bool | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)


def parse(cls: type[BaseModel], data: dict):
    """A validated request, or APIError 400 naming the first bad field."""
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc,
                       code="invalid_value") from None
    for name in UNSUPPORTED:
        value = (req.model_extra or {}).get(name)
        if value not in (None, False, 0, {}, [], "text", {"type": "text"}):
            raise APIError(400, f"'{name}' is not supported by this server (slm); leave it out",
                           param=name, code="unsupported_parameter")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings", param="stop")
    return req


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
              "assistant": "assistant", "tool": "user"}


def render_chat(messages: list[Message], tok) -> str:
    """The plain "User: ... / Assistant:" prompt text of the module docstring (base models)."""
    turns = [f"{PLAIN_ROLES[m.role]}: {m.text}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def chat_ids(messages: list[Message], tok) -> list[int]:
    """The prompt's token ids: the chat template (src/data/chat.py) on a chat model, else the
    plain rendering after an end-of-text token."""
    if chat_format(tok) == "plain":
        return [tok.eot_id, *tok.encode(render_chat(messages, tok))]
    from src.data.chat import render

    msgs = [{"role": CHAT_ROLES[m.role], "content": m.text} for m in messages]
    return render(tok, msgs, add_generation_prompt=True)[0]


def chat_format(tok) -> str:
    """'template' when the tokenizer has the chat tokens (a chat model), else 'plain'."""
    return "plain" if getattr(tok, "chat_ids", None) is None else "template"


def stops(req: _Common) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return tuple(s for s in ([req.stop] if isinstance(req.stop, str) else req.stop) if s)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """The response objects of one request (the same id and timestamp in every chunk)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _wrap(self, choices: list, obj: str, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def full(self, texts: list[str], finish: list[str], used: dict) -> dict:
        """The whole answer (stream: false)."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t, "refusal": None},
                        "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
            return self._wrap(choices, "chat.completion", usage=used)
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
        return self._wrap(choices, "text_completion", usage=used)

    def chunk(self, index: int, text: str | None = None, finish: str | None = None,
              role: bool = False) -> dict:
        """One streamed piece of choice `index`: new text, or its finish reason."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._wrap([choice], "chat.completion.chunk")
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._wrap([choice], "text_completion")

    def usage_chunk(self, used: dict) -> dict:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        return self._wrap([], "chat.completion.chunk" if self.chat else "text_completion",
                          usage=used)
