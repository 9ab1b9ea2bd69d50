"""The OpenAI wire format the gateway speaks: typed requests (pydantic, strict: ``"5"`` is not a
number, ``true`` is not an integer), the error object, and the response bodies.

Every error, whatever raised it, leaves as ``{"error": {"message", "type", "param", "code"}}``
with its HTTP status (:class:`APIError`). Parameters the gateway does not implement but clients
commonly send (``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``user``) are accepted
and ignored; ones that would change the answer's shape (``n`` above 1, ``echo``, ``suffix``,
``best_of`` above 1, tools) are refused with a 400 naming the parameter.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOPS = 4
MAX_TEXT = 1 << 20


class APIError(Exception):
    """An answer that is an error: HTTP ``status`` and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_validation(exc: ValidationError | Any) -> APIError:
    """A 400 naming the first offending field, from pydantic's (or FastAPI's) validation errors."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return invalid("the request body is invalid", code="invalid_request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic names the union member tried (`prompt.str`); the client only knows the field
    loc = [p for p in loc if p not in {"str", "int", "float", "bool", "list[str]", "list[int]", "function-after"}]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    message = first.get("msg", "invalid value")
    if kind == "missing":
        return invalid(f"missing required parameter '{param}'", param, "missing_required_parameter")
    text = f"'{param}': {message}" if param else message
    return invalid(f"invalid parameter {text}" if param else text, param, "invalid_type" if "type" in kind or
                   "valid" in message else "invalid_value")


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, max_length=256)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class _Sampled(_Request):
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: Optional[int] = Field(None, ge=1, le=128)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    max_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise invalid(f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise invalid("'stop' strings must not be empty", "stop")
        return tuple(stops)

    def check_single(self) -> None:
        if self.n not in (None, 1):
            raise invalid(f"'n' must be 1 (one choice per prompt), got {self.n}", "n", "unsupported_value")


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str], list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=1)

    def prompts(self) -> list[Union[str, list[int]]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise invalid("'prompt' must not be an empty list", "prompt")
        if isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        if len(self.prompt) > 64:
            raise invalid(f"'prompt' takes at most 64 prompts, got {len(self.prompt)}", "prompt")
        return list(self.prompt)  # type: ignore[arg-type]

    def check(self) -> None:
        self.check_single()
        if self.echo:
            raise invalid("'echo' is not supported", "echo", "unsupported_parameter")
        if self.suffix:
            raise invalid("'suffix' is not supported", "suffix", "unsupported_parameter")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2 ** 31)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Any]] = None

    def check(self) -> None:
        self.check_single()
        if self.tools:
            raise invalid("'tools' are not supported", "tools", "unsupported_parameter")
        if self.top_logprobs and not self.logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")


class EmbeddingRequest(_Request):
    input: Union[str, list[str]]
    encoding_format: Optional[Literal["float", "base64"]] = "float"
    dimensions: Optional[int] = Field(None, ge=1)

    def texts(self, limit: int) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise invalid("'input' must not be an empty list", "input")
        if len(texts) > limit:
            raise invalid(f"'input' takes at most {limit} texts, got {len(texts)}", "input")
        if any(not t for t in texts):
            raise invalid("'input' texts must not be empty strings", "input")
        if self.dimensions is not None:
            raise invalid("'dimensions' is not supported (the model's embedding size is fixed)", "dimensions",
                          "unsupported_parameter")
        return texts


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def embedding_value(row: Any, fmt: Optional[str]) -> Union[list[float], str]:
    """A row as a list of floats or, for ``base64``, the little-endian float32 bytes base64-encoded
    (what the official client asks for and decodes)."""
    values = [float(v) for v in row.tolist()]
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return values


__all__ = ["APIError", "invalid", "from_validation", "CompletionRequest", "ChatRequest", "EmbeddingRequest",
           "Message", "new_id", "now", "usage", "embedding_value"]
