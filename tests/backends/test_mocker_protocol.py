"""Unit tests of request validation and SSE templates (no processes)."""

from __future__ import annotations

import json

import pytest

from dynamo.backends.mocker.protocol import ApiError, StreamFormat, parse_request


def err(body, chat=True) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as e:
        parse_request(raw, chat=chat)
    return e.value


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body,param",
    [
        (b"", None),
        (b"{not json", None),
        (b"[1, 2]", None),
        ({"model": "m"}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": MSG, "max_tokens": "5"}, "max_tokens"),
        ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"messages": MSG, "max_tokens": True}, "max_tokens"),
        ({"messages": MSG, "n": 2}, "n"),
        ({"messages": MSG, "stream": "yes"}, "stream"),
        ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": MSG, "stop": [1]}, "stop"),
        ({"messages": MSG, "stop": [""]}, "stop"),
        ({"messages": MSG, "seed": 1.5}, "seed"),
        ({"messages": MSG, "temperature": "hot"}, "temperature"),
        ({"messages": MSG, "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"messages": MSG, "kv_transfer_params": [1]}, "kv_transfer_params"),
        ({"messages": MSG, "model": 3}, "model"),
    ],
)
def test_chat_validation_errors(body, param):
    e = err(body)
    assert e.status == 400 and e.param == param
    payload = json.loads(e.body())
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["code"] == 400 and payload["error"]["type"] == "BadRequestError"


@pytest.mark.parametrize(
    "body",
    [{"model": "m"}, {"prompt": 5}, {"prompt": []}, {"prompt": [1, "a"]}, {"prompt": ["a", "b"]},
     {"prompt": [-1]}, {"prompt": "x", "echo": True}],
)
def test_completion_validation_errors(body):
    assert err(body, chat=False).status == 400


def test_valid_requests_parse():
    r = parse_request(
        json.dumps({"messages": MSG, "max_completion_tokens": 7, "stream": True,
                    "stream_options": {"include_usage": True}, "stop": "x", "seed": 3, "extra": 1}).encode(),
        chat=True,
    )
    assert (r.max_tokens, r.stream, r.include_usage, r.stop, r.seed) == (7, True, True, ["x"], 3)
    r = parse_request(b'{"prompt": [[1, 2, 3]], "max_tokens": 2}', chat=False)
    assert r.prompt == [1, 2, 3]
    r = parse_request(b'{"prompt": ["hello"]}', chat=False)
    assert r.prompt == "hello" and r.max_tokens == 16  # vLLM's completions default


def test_stream_chunks_are_valid_json():
    for chat in (True, False):
        f = StreamFormat(chat=chat, response_id="id-1", created=5, model='m"x')
        chunk = f.head + b'"tok"' + f.tail
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        obj = json.loads(chunk[6:])
        assert obj["model"] == 'm"x' and obj["choices"][0]["finish_reason"] is None
        final = json.loads((f.head + b'""' + f.final_tail("length", None))[6:])
        assert final["choices"][0]["finish_reason"] == "length"
        usage = json.loads(f.usage_chunk(3, 4)[6:])
        assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
        cont = json.loads(f.with_usage(chunk, 3, 1)[6:])
        assert cont["usage"]["completion_tokens"] == 1
