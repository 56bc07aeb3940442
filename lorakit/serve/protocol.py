"""OpenAI's request and response JSON, as vLLM's OpenAI-compatible server serves it.

Request bodies are parsed strictly from JSON (pydantic, ``strict=True``: ``"max_tokens": "5"`` is refused, an int is
a float); unknown fields are ignored, as OpenAI and vLLM do. Fields lorakit does not implement are refused when set
to anything but their default (:func:`refuse_unsupported`), never silently ignored. Errors have OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` (:class:`ApiError`).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An HTTP error with OpenAI's body; ``param`` names the request field at fault, if any."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
             409: "ConflictError", 413: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "BadRequestError"),
                          "param": self.param, "code": self.status}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk with the usage counts (and no choices)."""


class _Sampling(_Body):
    """The fields completions and chat share."""

    model: str
    """The base (``--served-model-name``) or an adapter's name."""
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    """vLLM's extension: decode past the end-of-sequence token, up to max_tokens."""
    return_token_ids: bool = False
    """vLLM's extension: the prompt's and the output's token ids in the response (and in each stream chunk)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", "stop")
        return stops


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text; content parts other than ``{"type": "text"}`` are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"only text content parts are supported, got {json.dumps(part)[:80]}", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class LoadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """``raw`` JSON as ``model``, or an :class:`ApiError` 400 naming the first bad field."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] in ("json_invalid", "json_type"):
            raise ApiError(400, f"the request body is not valid JSON: {first['msg']}") from None
        if not first["loc"]:
            got = json.dumps(first.get("input"))[:80]
            raise ApiError(400, f"the request body must be a JSON object, got {got}") from None
        where = _path(first["loc"])
        got = "" if first["type"] == "missing" else f" (got {json.dumps(first.get('input'))[:80]})"
        branches = [e["msg"] for e in err.errors() if _path(e["loc"]) == where]
        if len(branches) > 1:  # a field that takes several types: each type's complaint
            raise ApiError(400, f"field {where!r} has none of its accepted types{got}: {'; '.join(branches)}",
                           where) from None
        raise ApiError(400, f"field {where!r}: {first['msg']}{got}", where) from None


def _path(loc: tuple) -> str:
    """A field's path (``messages.0.content``) without pydantic's union-branch tags (``str``, ``list[int]``)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def refuse_unsupported(req: _Sampling) -> None:
    """Options lorakit serve does not implement, refused by name when set (never silently ignored)."""
    checks = [("n", req.n != 1, "n must be 1 (one choice per request)"),
              ("presence_penalty", req.presence_penalty != 0, "presence_penalty is not implemented"),
              ("frequency_penalty", req.frequency_penalty != 0, "frequency_penalty is not implemented"),
              ("logit_bias", bool(req.logit_bias), "logit_bias is not implemented")]
    if isinstance(req, CompletionRequest):
        checks += [("echo", req.echo, "echo is not implemented"),
                   ("logprobs", req.logprobs is not None, "logprobs is not implemented"),
                   ("best_of", req.best_of not in (None, 1), "best_of must be 1"),
                   ("suffix", bool(req.suffix), "suffix is not implemented")]
    else:
        checks += [("logprobs", req.logprobs, "logprobs is not implemented"),
                   ("tools", bool(req.tools), "tools (function calling) are not implemented"),
                   ("response_format", req.response_format not in (None, {"type": "text"}),
                    "response_format other than {'type': 'text'} is not implemented")]
    for param, bad, message in checks:
        if bad:
            raise ApiError(400, f"{message} in lorakit serve", param)


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(rid: str, model: str, chat: bool, text: str, finish: str, prompt_ids: list[int],
                  completion: int, token_ids: list[int] | None) -> dict[str, Any]:
    """A whole response; ``token_ids`` (``return_token_ids``) adds vLLM's ``token_ids`` to the choice and
    ``prompt_token_ids`` (in the choice for completions, at the top for chat)."""
    content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    choice: dict[str, Any] = {"index": 0, **content, "logprobs": None, "finish_reason": finish}
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(len(prompt_ids), completion)}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        (body if chat else choice)["prompt_token_ids"] = prompt_ids
    return body


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool = False,
          counts: tuple[int, int] | None = None, token_ids: list[int] | None = None) -> str:
    """One server-sent event: ``data: {json}`` and a blank line. ``counts`` (prompt, completion): the usage chunk
    (``stream_options.include_usage``), with no choices; ``token_ids``: the chunk's new ids (``return_token_ids``)."""
    if counts is not None:
        choices: list[dict[str, Any]] = []
    elif chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    if token_ids is not None and choices:
        choices[0]["token_ids"] = token_ids
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": int(time.time()), "model": model, "choices": choices}
    if counts is not None:
        body["usage"] = usage(*counts)
    return f"data: {json.dumps(body)}\n\n"
