"""OpenAI request validation and response encoding, shaped like vLLM's.

Validation turns every client mistake into an :class:`ApiError` carrying the
HTTP status and the OpenAI error body ``{"error": {"message", "type",
"param", "code"}}`` (vLLM's shape: ``type`` is e.g. ``BadRequestError``,
``code`` the HTTP status). Unknown request fields are accepted and ignored,
as vLLM does.

Streaming responses are assembled from byte templates built once per
request; a token chunk is ``head + json(text) + tail``.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgspec

__all__ = [
    "ApiError",
    "GenerationRequest",
    "parse_request",
    "StreamFormat",
    "usage_dict",
    "json_encode",
]

json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """A client-visible error rendered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "BadRequestError")

    def body(self) -> bytes:
        return json_encode(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        )


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass
class GenerationRequest:
    """A validated /v1/chat/completions or /v1/completions body."""

    chat: bool
    model: str | None = None
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    include_stop: bool = False
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    kv_transfer_params: dict | None = None


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _int(body: dict, key: str, *, minimum: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if type(v) is not int:
        raise bad(f"'{key}' must be an integer, got {_type_name(v)}", key)
    if minimum is not None and v < minimum:
        raise bad(f"'{key}' must be at least {minimum}, got {v}", key)
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if type(v) is not bool:
        raise bad(f"'{key}' must be a boolean, got {_type_name(v)}", key)
    return v


_FLOAT_MAX = sys.float_info.max  # a JSON integer beyond it (10**400) is no float: refused, not an overflow


def _number(body: dict, key: str, lo: float | None = None, hi: float | None = None) -> None:
    v = body.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not -_FLOAT_MAX <= v <= _FLOAT_MAX:
        raise bad(f"'{key}' must be a finite number, got {_type_name(v)}", key)  # NaN fails the range too
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        limits = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise bad(f"'{key}' must be {limits}, got {v}", key)


def _messages(v: Any) -> list[dict]:
    if v is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(v, list):
        raise bad(f"'messages' must be an array, got {_type_name(v)}", "messages")
    if not v:
        raise bad("'messages' must contain at least one message", "messages")
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object, got {_type_name(m)}", where)
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"'{where}.role' must be a non-empty string", f"{where}.role")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise bad(f"'{where}.content' must be a string or an array of parts", f"{where}.content")
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise bad(f"'{pw}' must be an object", pw)
            if part.get("type") != "text":
                raise bad(f"'{pw}': only text content parts are supported by the mocker", pw)
            if not isinstance(part.get("text"), str):
                raise bad(f"'{pw}.text' must be a string", pw)
    return v


def _token_list(v: list, param: str) -> list[int]:
    if not v:
        raise bad(f"'{param}' must not be empty", param)
    try:
        # C-speed type check: long prompts are validated in microseconds.
        ids = array("q", v)
        if bool in set(map(type, v)):  # array() takes true and false as 1 and 0
            raise TypeError
    except (TypeError, OverflowError):
        raise bad(f"'{param}' must be a string or an array of token ids", param) from None
    if min(ids) < 0:
        raise bad(f"'{param}' contains a negative token id {min(ids)}", param)
    return v


def _prompt(v: Any) -> str | list[int]:
    if v is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise bad(f"'prompt' must be a string or an array of token ids, got {_type_name(v)}", "prompt")
    if not v:
        raise bad("'prompt' must not be empty", "prompt")
    if type(v[0]) is int:
        return _token_list(v, "prompt")
    if len(v) == 1:
        if isinstance(v[0], str):
            return v[0]
        if isinstance(v[0], list):
            return _token_list(v[0], "prompt")
    if all(isinstance(p, (str, list)) for p in v):
        raise bad("batched prompts (more than one prompt per request) are not supported by the mocker", "prompt")
    raise bad("'prompt' must be a string, an array of token ids, or a one-element array of either", "prompt")


def _tools(body: dict) -> None:
    """Tool definitions are checked; a request that lets the model call them is refused (the
    mocker cannot produce tool calls, as vLLM refuses without a tool parser)."""
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise bad("'tools' must be an array of {\"type\": \"function\", \"function\": {\"name\": ...}} objects", "tools")
    if tools and body.get("tool_choice", "auto") != "none":
        raise bad("tool calls are not supported by the mocker; send tool_choice \"none\" or no tools", "tool_choice")


def _response_format(v: Any) -> None:
    if v is None:
        return
    kind = v.get("type") if isinstance(v, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise bad("'response_format.type' must be one of text, json_object, json_schema", "response_format")
    if kind != "text":
        raise bad(f"response_format {kind!r} is not supported by the mocker (it generates free text)",
                  "response_format")


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("'stop' must be a string or an array of strings", "stop")
    if any(s == "" for s in v):
        raise bad("'stop' cannot contain an empty string", "stop")
    return list(v)


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's and OpenAI's default for /v1/completions


def parse_request(raw: bytes, *, chat: bool) -> GenerationRequest:
    """Validate a request body; raises :class:`ApiError` (400) on any client mistake."""
    if not raw:
        raise bad("request body is empty; expected a JSON object")
    try:
        body = _json_decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {_type_name(body)}")

    req = GenerationRequest(chat=chat)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_type_name(model)}", "model")
    req.model = model

    if chat:
        req.messages = _messages(body.get("messages"))
        mct = _int(body, "max_completion_tokens", minimum=1)
        mt = _int(body, "max_tokens", minimum=1)
        req.max_tokens = mct if mct is not None else mt
        if _bool(body, "logprobs") or _int(body, "top_logprobs", minimum=0):
            raise bad("'logprobs' is not supported by the mocker (it has no model to take them from)", "logprobs")
        _tools(body)
    else:
        req.prompt = _prompt(body.get("prompt"))
        req.max_tokens = _int(body, "max_tokens", minimum=1)
        if req.max_tokens is None:
            req.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        if _int(body, "logprobs", minimum=0) is not None:
            raise bad("'logprobs' is not supported by the mocker (it has no model to take them from)", "logprobs")
        if _bool(body, "echo"):
            raise bad("'echo' is not supported by the mocker", "echo")
    _response_format(body.get("response_format"))

    n = _int(body, "n", minimum=1)
    if n is not None and n > 1:
        raise bad("n > 1 is not supported by the mocker; send n separate requests", "n")
    _int(body, "best_of", minimum=1)
    req.min_tokens = _int(body, "min_tokens", minimum=0) or 0
    if req.max_tokens is not None and req.min_tokens > req.max_tokens:
        raise bad(
            f"'min_tokens' ({req.min_tokens}) must be less than or equal to 'max_tokens' ({req.max_tokens})",
            "min_tokens",
        )
    req.ignore_eos = _bool(body, "ignore_eos")
    req.stop = _stop(body.get("stop"))
    req.include_stop = _bool(body, "include_stop_str_in_output")
    v = body.get("stop_token_ids")
    if v is not None and (not isinstance(v, list) or not all(type(t) is int for t in v)):
        raise bad("'stop_token_ids' must be an array of integers", "stop_token_ids")
    seed = body.get("seed")
    if seed is not None:
        if type(seed) is not int:
            raise bad(f"'seed' must be an integer, got {_type_name(seed)}", "seed")
        if not -(2**63) <= seed < 2**64:
            raise bad("'seed' must fit in 64 bits", "seed")
    req.seed = seed
    _number(body, "temperature", 0.0, None)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    _number(body, "repetition_penalty", 0.0, None)
    _int(body, "top_k", minimum=-1)

    req.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        if not req.stream:
            raise bad("Stream options can only be defined when `stream=True`.", "stream_options")
        req.include_usage = _bool(opts, "include_usage")
        # as vLLM: per-chunk usage only together with include_usage
        req.continuous_usage = _bool(opts, "continuous_usage_stats") and req.include_usage

    ktp = body.get("kv_transfer_params")
    if ktp is not None and not isinstance(ktp, dict):
        raise bad("'kv_transfer_params' must be an object", "kv_transfer_params")
    req.kv_transfer_params = ktp
    return req


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


class StreamFormat:
    """Pre-built SSE byte templates for one streamed response."""

    __slots__ = ("head", "tail", "chat", "prefix", "role_chunk")

    def __init__(self, *, chat: bool, response_id: str, created: int, model: str) -> None:
        self.chat = chat
        ident = json_encode(response_id).decode()
        model_json = json_encode(model).decode()
        if chat:
            self.prefix = f'{{"id":{ident},"object":"chat.completion.chunk","created":{created},"model":{model_json}'
            self.head = f'data: {self.prefix},"choices":[{{"index":0,"delta":{{"content":'.encode()
            self.tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            self.role_chunk = (
                f'data: {self.prefix},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                '"logprobs":null,"finish_reason":null}]}\n\n'
            ).encode()
        else:
            self.prefix = f'{{"id":{ident},"object":"text_completion","created":{created},"model":{model_json}'
            self.head = f'data: {self.prefix},"choices":[{{"index":0,"text":'.encode()
            self.tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            self.role_chunk = b""

    def final_tail(self, finish_reason: str, stop_reason: str | None) -> bytes:
        sr = json_encode(stop_reason).decode()
        fr = json_encode(finish_reason).decode()
        if self.chat:
            return f'}},"logprobs":null,"finish_reason":{fr},"stop_reason":{sr}}}]}}\n\n'.encode()
        return f',"logprobs":null,"finish_reason":{fr},"stop_reason":{sr}}}]}}\n\n'.encode()

    def with_usage(self, chunk: bytes, prompt_tokens: int, completion_tokens: int) -> bytes:
        """Add a ``usage`` member to one chunk (``continuous_usage_stats``)."""
        usage = json_encode(usage_dict(prompt_tokens, completion_tokens))
        return chunk[:-3] + b',"usage":' + usage + b"}\n\n"

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = json_encode(usage_dict(prompt_tokens, completion_tokens)).decode()
        return f'data: {self.prefix},"choices":[],"usage":{usage}}}\n\n'.encode()

    @staticmethod
    def error_chunk(err: ApiError) -> bytes:
        return b"data: " + err.body() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
