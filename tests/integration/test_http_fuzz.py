"""Bad HTTP requests against the real frontend (agg profile, mocker workers) and a bare mocker.

The rule checked: bad input gets a 4xx whose body is OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``), never a 5xx, a dropped connection or a
hang; a stream ends with ``data: [DONE]`` (after an error event, if any); good requests still
work afterwards and no process crashed. A table of hand-picked cases, a concurrent mix with the
official ``openai`` client, and one bounded randomized loop (fixed seed) that mutates valid bodies.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
import openai
import pytest

from tests.backends.conftest import shared_mocker
from tests.conftest import REPO, Run, kill_run

pytestmark = pytest.mark.slow

FRONTEND_MODEL = "Qwen/Qwen3-0.6B"  # profiles/agg.yaml
MOCKER_MODEL = "m"
TARGETS = ("frontend", "mocker")
REPLY_DEADLINE = 12.0  # seconds for a whole answer, stream included: longer is a hang
HUGE = 10**400  # a JSON integer Python decodes exactly but cannot turn into a float


# --------------------------------------------------------------------------- processes


@dataclass
class Target:
    name: str
    url: str
    model: str
    alive: Callable[[], str | None]  # why the target no longer serves as it did (crashed, restarted)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`dynamo serve profiles/agg.yaml --backend mocker` on free loopback ports; killed at teardown."""
    tmp = tmp_path_factory.mktemp("fuzz-stack")
    run_dir, output = tmp / "run", tmp / "serve.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo.cli.app", "serve", "profiles/agg.yaml", "--backend", "mocker",
             "--set", "frontend.port=0", "--set", "nats.port=0", "--set", "ports.base=0",
             "--run-dir", str(run_dir), "--no-color"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=REPO,
            env={**os.environ, "DYNAMO_HOME": str(tmp / "home")},
        )
    run = Run(proc, run_dir, output)
    try:
        state = run.wait_ready(60)
        yield run, state
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        kill_run(run)  # what SIGINT did not stop


@pytest.fixture(scope="module")
def bare_mocker(tmp_path_factory):
    """`python -m dynamo.backends.mocker --served-model-name m` on a free loopback port; stopped at teardown."""
    yield from shared_mocker(tmp_path_factory, MOCKER_MODEL)


@pytest.fixture(scope="module")
def targets(stack, bare_mocker) -> dict[str, Target]:
    run, state = stack
    pids = {name: proc["pid"] for name, proc in state["processes"].items()}

    def stack_alive() -> str | None:
        if run.proc.poll() is not None:
            return f"dynamo serve exited ({run.proc.returncode})"
        now = {name: proc["pid"] for name, proc in run.state().get("processes", {}).items()}
        changed = {name for name in pids if now.get(name) != pids[name]}
        return f"restarted: {sorted(changed)}" if changed else None

    def mocker_alive() -> str | None:
        code = bare_mocker.proc.poll()
        return None if code is None else f"mocker exited ({code}): {bare_mocker.stderr()[-2000:]}"

    return {"frontend": Target("frontend", state["endpoint"], FRONTEND_MODEL, stack_alive),
            "mocker": Target("mocker", bare_mocker.url, MOCKER_MODEL, mocker_alive)}


# --------------------------------------------------------------------------- checking answers


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: bytes


def send(url: str, method: str = "POST", content: bytes | None = None, headers: dict | None = None) -> Reply:
    """One request with a deadline on the whole answer (httpx's timeout is per read)."""
    started = time.monotonic()
    with _client().stream(method, url, content=content, headers=headers or {}) as reply:
        body = b""
        for piece in reply.iter_raw():
            body += piece
            if time.monotonic() - started > REPLY_DEADLINE:
                raise AssertionError(f"{method} {url}: the answer did not end within {REPLY_DEADLINE}s "
                                     f"(so far {body[-300:]!r})")
        return Reply(reply.status_code, reply.headers, body)


_clients: list[httpx.Client] = []


def _client() -> httpx.Client:
    """One pooled client for the module (making one costs ~30 ms: its TLS context)."""
    if not _clients:
        _clients.append(httpx.Client(timeout=REPLY_DEADLINE, trust_env=False))
    return _clients[0]


@pytest.fixture(scope="module", autouse=True)
def _close_client():
    yield
    while _clients:
        _clients.pop().close()


def raw_http(url: str, data: bytes, timeout: float = REPLY_DEADLINE) -> Reply:
    """Send bytes as they are (for what no HTTP client sends) and parse a Connection: close answer."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                piece = sock.recv(65536)
                if not piece:
                    break
                received += piece
        except TimeoutError:
            raise AssertionError(f"no complete answer within {timeout}s: {received[:300]!r}") from None
        except ConnectionResetError:
            raise AssertionError(f"connection dropped after {received[:300]!r}") from None
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/"), f"no HTTP answer (connection dropped?): {received[:300]!r}"
    headers = httpx.Headers([tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line])
    if "chunked" in headers.get("transfer-encoding", ""):
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return Reply(int(lines[0].split()[1]), headers, body)


def openai_error(reply: Reply) -> dict:
    """The reply's OpenAI error object; fails if the body is not OpenAI-shaped."""
    assert reply.headers.get("content-type", "").startswith("application/json"), \
        f"{reply.status}: not JSON ({reply.headers.get('content-type')}): {reply.body[:300]!r}"
    try:
        error = json.loads(reply.body)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{reply.status}: not an OpenAI error: {reply.body[:300]!r}") from None
    assert isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    return error


def check_stream(reply: Reply) -> None:
    events = [e for e in reply.body.decode("utf-8", "replace").split("\n\n") if e.strip()]
    assert events and events[-1] == "data: [DONE]", f"the stream did not end with [DONE]: {reply.body[-400:]!r}"
    for event in events[:-1]:
        assert event.startswith("data: "), event
        data = json.loads(event[6:])
        if "error" in data:
            assert {"message", "type", "param", "code"} <= set(data["error"]), data


def check(reply: Reply, expect: str) -> None:
    """expect: "4xx" (an OpenAI error), "ok" (a 2xx answer), "any" (either, never anything else),
    "http-4xx" (a 4xx from aiohttp's HTTP parser, which answers in plain text before any
    application code runs: malformed HTTP, not a malformed API request; README, Faults)."""
    assert reply.status < 500, f"{reply.status} for bad input: {reply.body[:400]!r}"
    if expect == "http-4xx":
        assert 400 <= reply.status < 500, f"{reply.status}: {reply.body[:400]!r}"
        return
    if reply.status >= 400:
        assert expect != "ok", f"{reply.status}: {reply.body[:400]!r}"
        openai_error(reply)
        return
    assert expect != "4xx", f"bad input accepted ({reply.status}): {reply.body[:300]!r}"
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        check_stream(reply)


def still_serving(target: Target) -> None:
    why = target.alive()
    assert why is None, why
    reply = send(target.url + "/v1/completions", content=json.dumps(
        {"model": target.model, "prompt": "still there", "max_tokens": 2}).encode(),
        headers={"content-type": "application/json"})
    assert reply.status == 200 and json.loads(reply.body)["usage"]["completion_tokens"] == 2, reply


# --------------------------------------------------------------------------- the table

MODEL = "$MODEL"  # replaced by the target's served model name
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    id: str
    path: str = CHAT
    body: object = None  # JSON value (dumped), or raw bytes
    expect: str = "4xx"
    method: str = "POST"
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})
    raw: object = None  # (the encoded body) -> bytes sent as they are over a socket instead
    only: str | None = None  # "frontend" or "mocker"

    def encoded(self, model: str) -> bytes | None:
        if self.body is None:
            return None
        raw = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return raw.replace(b'"$MODEL"', json.dumps(model).encode())


def chat(**fields) -> dict:
    body = {"model": MODEL, "messages": USER, "max_tokens": 3}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _DROP}


def comp(**fields) -> dict:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()
DEEP = b"[" * 100_000 + b"]" * 100_000


def field_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, body: dict, expect: str = "4xx", path: str = CHAT, only: str | None = None) -> None:
        cases.append(Case(f"{'chat' if path == CHAT else 'comp'}-{name}", path, body, expect, only=only))

    for stream in (False, True):
        s = "-stream" if stream else ""
        add(f"model-int{s}", chat(model=7, stream=stream))
        add(f"model-list{s}", chat(model=[MODEL], stream=stream))
        add(f"model-unknown{s}", chat(model="no-such-model", stream=stream))
        add(f"messages-missing{s}", chat(messages=_DROP, stream=stream))
        add(f"messages-null{s}", chat(messages=None, stream=stream))
        add(f"messages-empty{s}", chat(messages=[], stream=stream))
        add(f"messages-string{s}", chat(messages="hi", stream=stream))
        add(f"prompt-empty-list{s}", comp(prompt=[], stream=stream), path=COMPLETIONS)
        add(f"max_tokens-negative{s}", chat(max_tokens=-5, stream=stream))
        add(f"temperature-huge-int{s}", chat(temperature=HUGE, stream=stream), only="mocker")
        add(f"top_p-huge-int{s}", comp(top_p=HUGE, stream=stream), path=COMPLETIONS, only="mocker")
    # the frontend turns the worker's 500 into retries on every worker, then 503 after 3 s: a few only
    add("temperature-huge-int", chat(temperature=HUGE), only="frontend")
    add("top_p-huge-int-stream", comp(top_p=HUGE, stream=True), path=COMPLETIONS, only="frontend")
    add("frequency_penalty-huge-negative-int", chat(frequency_penalty=-HUGE), only="frontend")
    for key in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        add(f"{key}-huge-int", chat(**{key: HUGE}), only="mocker")

    messages = {
        "not-object": [5], "null-item": [None], "no-role": [{"content": "x"}], "role-int": [{"role": 5, "content": "x"}],
        "role-empty": [{"role": "", "content": "x"}], "role-list": [{"role": ["user"], "content": "x"}],
        "content-int": [{"role": "user", "content": 5}], "content-object": [{"role": "user", "content": {}}],
        "part-int": [{"role": "user", "content": [1]}], "part-null": [{"role": "user", "content": [None]}],
        "part-no-type": [{"role": "user", "content": [{"text": "x"}]}],
        "part-text-int": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        "part-text-missing": [{"role": "user", "content": [{"type": "text"}]}],
        "part-image": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "part-nested-list": [{"role": "user", "content": [[{"type": "text", "text": "x"}]]}],
    }
    for name, value in messages.items():
        add(f"messages-{name}", chat(messages=value))
    odd_messages = {  # odd but not the gateway's business: any answer but a 5xx
        "name-int": [{"role": "user", "content": "x", "name": 5}],
        "tool_calls-string": [{"role": "assistant", "content": None, "tool_calls": "x"}, *USER],
        "tool_calls-odd": [{"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}, *USER],
        "role-unknown": [{"role": "wizard", "content": "x"}],
        "content-null": [{"role": "user", "content": None}],
        "content-empty-parts": [{"role": "user", "content": []}],
        "special-tokens": [{"role": "user\n<|im_end|>", "content": "<|im_start|>system\n<|im_end|>"}],
        "nul-char": [{"role": "user", "content": "\u0000"}],
    }
    for name, value in odd_messages.items():
        add(f"messages-{name}", chat(messages=value), expect="any")

    prompts = {
        "null": None, "int": 5, "object": {"a": 1}, "nested-empty": [[]], "bool": [True], "float": [1.5],
        "negative": [-1], "u32-overflow": [2**32], "huge": [HUGE], "null-id": [None], "three-levels": [[[1]]],
        "mixed": ["a", 1], "ids-and-text": [[1], "a"], "batch-text": ["a", "b"], "batch-ids": [[1], [2]],
        "out-of-vocab": [2**31], "empty-string": "", "one-empty-string": [""],
        "int-and-bool": [1, True],  # not token ids; the frontend refuses it, the mocker must too
    }
    for name, value in prompts.items():
        add(f"prompt-{name}", comp(prompt=value), path=COMPLETIONS)
    add("prompt-missing", comp(prompt=_DROP), path=COMPLETIONS)

    numbers = {
        "max_tokens": {"zero": 0, "float": 1.5, "string": "3", "bool": True, "huge": HUGE, "list": [3]},
        "max_completion_tokens": {"zero": 0, "negative": -1, "float": 2.5, "string": "3", "huge": HUGE},
        "min_tokens": {"negative": -1, "float": 0.5, "string": "x", "huge": HUGE, "above-max": 10},
        "n": {"zero": 0, "two": 2, "float": 1.5, "string": "1", "huge": HUGE},
        "seed": {"float": 1.5, "string": "1", "bool": True, "u64-overflow": 2**64, "i64-underflow": -(2**63) - 1,
                 "huge": HUGE},
        "temperature": {"negative": -1, "string": "hot", "bool": True, "list": []},
        "top_p": {"above-one": 1.5, "negative": -0.1, "string": "x"},
        "presence_penalty": {"too-big": 3},
        "stop": {"int": 5, "int-list": [5], "null-list": [None], "empty-string": [""], "object": {}},
        "stream": {"string": "yes", "int": 1, "list": []},
        "stream_options": {"list": []},
        "tools": {"string": "x", "int-list": [1], "no-function": [{"type": "function"}],
                  "callable": [{"type": "function", "function": {"name": "f"}}]},
        "response_format": {"string": "json", "bogus": {"type": "bogus"}, "json": {"type": "json_object"}},
        "logprobs": {"string": "yes", "true": True},
        "top_logprobs": {"negative": -1},
    }
    for key, values in numbers.items():
        for name, value in values.items():
            add(f"{key}-{name}", chat(**{key: value}))
    for name, value in {"zero": 0, "float": 1.5, "huge": HUGE}.items():
        add(f"max_tokens-{name}", comp(max_tokens=value), path=COMPLETIONS)
    add("logprobs-int", comp(logprobs=1), path=COMPLETIONS)
    add("echo-true", comp(echo=True), path=COMPLETIONS)
    add("stream_options-without-stream", chat(stream_options={"include_usage": True}))
    add("stream_options-include_usage-string", chat(stream=True, stream_options={"include_usage": "yes"}))
    add("stream_options-continuous-string", chat(stream=True, stream_options={"include_usage": True,
                                                                               "continuous_usage_stats": "x"}))

    odd_fields = {  # odd shapes a server may accept or refuse; never with a 5xx or an unended stream
        "stream_options-empty": {"stream": True, "stream_options": {}},
        "stream_options-unknown-key": {"stream": True, "stream_options": {"x": 1}},
        "stream_options-include_usage-false": {"stream": True, "stream_options": {"include_usage": False}},
        "stream_options-continuous-only": {"stream": True, "stream_options": {"continuous_usage_stats": True}},
        "stream_options-both": {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        "stream_options-null": {"stream": True, "stream_options": None},
        "stream-null": {"stream": None},
        "max_tokens-integral-float": {"max_tokens": 3.0},
        "seed-negative": {"seed": -1},
        "temperature-tiny": {"temperature": 5e-324},
        "temperature-max-float": {"temperature": 1.7976931348623157e308},
        "logit_bias-string": {"logit_bias": "x"},
        "logit_bias-odd": {"logit_bias": {"x": "y", "99999999999": HUGE}},
        "user-int": {"user": 5},
        "user-long": {"user": "u" * 10000},
        "tool_choice-bogus": {"tool_choice": "bogus"},
        "tools-empty": {"tools": [], "tool_choice": "auto"},
        "tools-choice-none": {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
        "response_format-text": {"response_format": {"type": "text"}},
        "unknown-field": {"x-unknown": {"deep": [1, 2, {"a": None}]}},
        "stop-many": {"stop": ["zz"] * 1000},
        "stop-long": {"stop": "z" * 100_000},
    }
    for name, extra in odd_fields.items():
        add(name, chat(**extra), expect="any")
        add(name, comp(**extra), expect="any", path=COMPLETIONS)
    return cases


def raw_cases() -> list[Case]:
    json_ct = {"content-type": "application/json"}
    ok_body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    ok_raw = json.dumps(ok_body).encode()  # "$MODEL" is replaced in raw bytes too (Case.encoded)
    cases = [
        Case("body-empty", COMPLETIONS, b""),
        Case("body-not-json", COMPLETIONS, b"{not json"),
        Case("body-array", CHAT, b"[1, 2]"),
        Case("body-null", CHAT, b"null"),
        Case("body-number", COMPLETIONS, b"5"),
        Case("body-string", COMPLETIONS, b'"x"'),
        Case("body-trailing-garbage", COMPLETIONS, ok_raw + b" xyz"),
        Case("body-bom", COMPLETIONS, b"\xef\xbb\xbf" + ok_raw),
        Case("body-utf16", COMPLETIONS, ok_raw.decode().encode("utf-16")),
        Case("invalid-utf8-prompt", COMPLETIONS, b'{"model": "$MODEL", "prompt": "\xff\xfe", "max_tokens": 2}'),
        Case("invalid-utf8-content", CHAT, b'{"model": "$MODEL", "messages": [{"role": "user", "content": "\xc3\x28"}]}'),
        Case("lone-surrogate", COMPLETIONS, b'{"model": "$MODEL", "prompt": "\\ud800", "max_tokens": 2}'),
        Case("nan-literal", COMPLETIONS, b'{"model": "$MODEL", "prompt": "x", "temperature": NaN}'),
        Case("infinity-literal", CHAT, b'{"model": "$MODEL", "messages": [{"role": "user", "content": "x"}], '
                                       b'"top_p": Infinity}'),
        Case("float-overflow", COMPLETIONS, b'{"model": "$MODEL", "prompt": "x", "max_tokens": 1e999}'),
        Case("int-100k-digits", COMPLETIONS, b'{"model": "$MODEL", "prompt": "x", "max_tokens": ' + b"9" * 100_000 + b"}"),
        Case("nested-100k-arrays", COMPLETIONS, DEEP),
        Case("nested-100k-objects", COMPLETIONS, b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        Case("nested-100k-in-a-field", CHAT, b'{"model": "$MODEL", "messages": [{"role": "user", "content": "x"}], '
                                             b'"user": ' + DEEP + b"}"),
        Case("nested-1m-unclosed", COMPLETIONS, b"[" * 1_000_000),
        Case("duplicate-keys", COMPLETIONS, b'{"model": "$MODEL", "prompt": "x", "prompt": 5}'),
        # content types and encodings
        Case("content-type-missing", COMPLETIONS, ok_body, "ok", headers={}),
        Case("content-type-text", COMPLETIONS, ok_body, "ok", headers={"content-type": "text/plain"}),
        Case("content-type-form", COMPLETIONS, ok_body, "ok",
             headers={"content-type": "application/x-www-form-urlencoded"}),
        Case("content-type-garbage", COMPLETIONS, ok_body, "ok", headers={"content-type": ";;;==="}),
        Case("content-encoding-gzip-not-gzip", COMPLETIONS, ok_body,
             headers={**json_ct, "content-encoding": "gzip"}),
        Case("content-encoding-deflate-garbage", COMPLETIONS, b"xxxxx",
             headers={**json_ct, "content-encoding": "deflate"}),
        Case("content-encoding-br", COMPLETIONS, b"xxxxx", "http-4xx", headers={**json_ct, "content-encoding": "br"}),
        # methods and paths
        *[Case(f"{m}-{p.strip('/').replace('/', '_')}", p, None, method=m)
          for m in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS") for p in (CHAT, COMPLETIONS)],
        *[Case(f"POST-{p.strip('/').replace('/', '_')}", p, ok_body, only="frontend")
          for p in ("/health", "/live", "/metrics", "/v1/models")],
        Case("unknown-path", "/v1/nope", ok_body),
        Case("unknown-path-encoded", "/v1/%ff%00", ok_body),
        Case("method-unknown", COMPLETIONS, ok_body, "http-4xx", method="FOO"),
        # x-request-id
        *[Case(f"x-request-id-{name}", COMPLETIONS, ok_body, "ok", headers={**json_ct, "x-request-id": value})
          for name, value in {"7000-chars": b"r" * 7000, "tab": b"a\tb", "space": b"a b", "quotes": b'"q"\\',
                              "html": b"<script>", "empty": b""}.items()],
        Case("x-request-id-utf8", COMPLETIONS, ok_body, "ok", headers={**json_ct, "x-request-id": "é".encode()}),
        Case("x-request-id-invalid-utf8", COMPLETIONS, ok_body, "ok", headers={**json_ct, "x-request-id": b"\xe9\xff"}),
        Case("x-request-id-invalid-utf8-stream", COMPLETIONS, {**ok_body, "stream": True}, "ok",
             headers={**json_ct, "x-request-id": b"\xe9"}),
        Case("x-request-id-over-8k", COMPLETIONS, ok_body, "http-4xx", headers={**json_ct, "x-request-id": b"r" * 9000}),
        Case("x-request-id-control-char", COMPLETIONS, ok_body, "http-4xx", headers={**json_ct, "x-request-id": b"\x7f"}),
        # bytes no client library sends
        Case("chunked-body", COMPLETIONS, ok_body, "ok", raw=lambda body: b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n" + body[:5] + b"\r\n"
             + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n"),
        Case("chunked-bad-size", COMPLETIONS, expect="http-4xx", raw=lambda _: b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
             b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{\r\n0\r\n\r\n"),
        Case("http-1.0", COMPLETIONS, ok_body, "ok", raw=lambda body: b"POST /v1/completions HTTP/1.0\r\nHost: x\r\n"
             b"Content-Length: %d\r\n\r\n" % len(body) + body),
        Case("no-content-length", COMPLETIONS, raw=lambda _: b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ]
    for path in ("/health", "/live", "/metrics", "/v1/models"):
        for query in ("?a=1&a=2", "?%ff%00", "?" + "q" * 6000, "?;;=&&"):
            cases.append(Case(f"GET-{path.strip('/').replace('/', '_')}{query[:8]}", path + query, None,
                              "ok" if path != "/live" else "any", method="GET"))
    return cases


CASES = field_cases() + raw_cases()


def _ids() -> list:
    params = []
    for target in TARGETS:
        for case in CASES:
            if case.only in (None, target):
                params.append(pytest.param(target, case, id=f"{target}-{case.id}"))
    return params


@pytest.mark.parametrize("target_name, case", _ids())
def test_bad_request_gets_an_openai_4xx(targets, target_name, case):
    target = targets[target_name]
    path = case.path
    if case.raw is not None:
        reply = raw_http(target.url, case.raw(case.encoded(target.model)))
    else:
        reply = send(target.url + path, case.method, case.encoded(target.model), case.headers)
    if case.method == "GET" and path.startswith("/health") and target_name == "frontend":
        assert reply.status == 200 and json.loads(reply.body)["status"] == "healthy", reply
    else:
        check(reply, case.expect)
    still_serving(target)


@pytest.mark.parametrize("target_name, limit_mb", [("frontend", 32), ("mocker", 64)])
def test_a_body_over_the_limit_gets_413(targets, target_name, limit_mb):
    target = targets[target_name]
    huge = b'{"prompt": "' + b"x" * ((limit_mb + 1) * 2**20) + b'"}'
    reply = send(target.url + COMPLETIONS, content=huge, headers={"content-type": "application/json"})
    assert reply.status == 413, reply.status
    openai_error(reply)
    still_serving(target)


# --------------------------------------------------------------------------- concurrency and disconnects


CLEARLY_BAD = ("body-", "nested-", "chat-model-", "chat-messages-", "chat-max_tokens-", "chat-n-", "chat-stream-",
               "comp-prompt-")


def _cut_mid_body(url: str, head: bytes, body: bytes) -> None:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + body)  # the declared body is longer: the client leaves halfway


def _inflight_settles(target: Target, stack_state: dict) -> None:
    """No request is left in flight anywhere once every client is gone."""
    urls = [target.url]
    if target.name == "frontend":
        urls += [p["url"] for p in stack_state["processes"].values() if p.get("kind") == "worker"]
    deadline = time.monotonic() + 5
    while True:
        busy = {}
        for url in urls:
            for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
                if line.startswith(("dynamo_frontend_inflight_requests", "vllm:num_requests_running",
                                    "vllm:num_requests_waiting")) and float(line.rsplit(" ", 1)[1]) > 0:
                    busy[url] = line
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not busy, busy


@pytest.mark.parametrize("target_name", TARGETS)
def test_bad_requests_and_disconnects_mixed_with_good_streams(targets, stack, target_name):
    target = targets[target_name]
    api = openai.OpenAI(base_url=target.url + "/v1", api_key="none", max_retries=0, timeout=REPLY_DEADLINE)
    failures: list = []
    texts: list[str] = []
    bad_cases = [c for c in CASES if c.id.startswith(CLEARLY_BAD) and c.expect == "4xx" and c.only in (None, target.name)
                 and c.id != "comp-prompt-int-and-bool"]

    def good(i: int) -> None:
        try:
            for _ in range(3):
                chunks = list(api.chat.completions.create(
                    model=target.model, max_tokens=12, stream=True, stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": f"tell me a story {i}"}]))
                assert chunks[-1].usage.completion_tokens == 12
                texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            reply = api.completions.create(model=target.model, prompt=f"story {i}", max_tokens=5)
            assert reply.usage.completion_tokens == 5
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(("good", i, repr(exc)))

    def bad(i: int) -> None:
        for case in bad_cases[i::4]:
            try:
                check(send(target.url + case.path, case.method, case.encoded(target.model), case.headers), "4xx")
            except BaseException as exc:  # noqa: BLE001
                failures.append(("bad", case.id, repr(exc)[:300]))

    def leave_mid_stream(i: int) -> None:
        try:
            with httpx.stream("POST", target.url + COMPLETIONS, timeout=REPLY_DEADLINE, json={
                    "model": target.model, "prompt": f"long {i}", "max_tokens": 400, "stream": True}) as reply:
                for n, _ in enumerate(reply.iter_lines()):
                    if n >= 3:
                        break
        except BaseException as exc:  # noqa: BLE001
            failures.append(("leave", i, repr(exc)))

    def leave_mid_body(i: int) -> None:
        body = json.dumps({"model": target.model, "prompt": "x" * 200, "max_tokens": 3}).encode()
        try:
            for path in (COMPLETIONS, CHAT):
                _cut_mid_body(target.url, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body) + 1000), body)
                _cut_mid_body(target.url, b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              % path.encode(), b"ff\r\n" + body[:30])
        except BaseException as exc:  # noqa: BLE001
            failures.append(("cut", i, repr(exc)))

    threads = [threading.Thread(target=fn, args=(i,)) for i in range(4) for fn in (good, bad, leave_mid_stream, leave_mid_body)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert not [t for t in threads if t.is_alive()], "a client hung"
    assert not failures, failures
    assert len(texts) == 12 and all(texts)
    _inflight_settles(target, stack[1])
    still_serving(target)


# --------------------------------------------------------------------------- randomized


POOL = [None, True, False, 0, 1, -1, 3.0, 0.5, -0.5, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, HUGE, -HUGE, 1e308,
        -1e308, 5e-324, "", "x", "\u0000", "\n", "<|im_end|>", "a" * 3000, "é", "\U0001F600", [], [1], [-1], [2**33],
        [None], [[]], [[1, 2]], ["a", "b"], [{}], {}, {"a": None}, {"type": "text"}, {"type": "text", "text": "t"},
        {"role": "user"}, {"include_usage": "yes"}, {"include_usage": True, "continuous_usage_stats": True},
        {"continuous_usage_stats": True}, [{"role": "user", "content": "x"}],
        [{"type": "function", "function": {"name": "f"}}]]
KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "min_tokens", "n", "stop", "seed",
        "temperature", "top_p", "logit_bias", "stream", "stream_options", "user", "tools", "tool_choice",
        "response_format", "logprobs", "top_logprobs", "echo", "best_of", "ignore_eos", "top_k"]
VALID_CHAT = {"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
              "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 1, "n": 1, "stream": True,
              "stream_options": {"include_usage": True}, "user": "u", "logit_bias": {"1": 1}, "min_tokens": 1}
VALID_COMPLETION = {"model": MODEL, "prompt": "once upon", "max_tokens": 4, "stream": False, "stop": "x", "seed": 3,
                    "temperature": 0.0}


def _paths(value, at=()):
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, at + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, at + (i,))


def _set(value, at, new):
    if not at:
        return new
    holder = value
    for key in at[:-1]:
        holder = holder[key]
    holder[at[-1]] = new
    return value


def mutated(rng: random.Random) -> tuple[str, bytes]:
    """A valid body with one to three random changes; sometimes its bytes are cut or corrupted."""
    is_chat = rng.random() < 0.5
    body = copy.deepcopy(VALID_CHAT if is_chat else VALID_COMPLETION)
    if rng.random() < 0.5:
        body["stream"] = rng.random() < 0.7
    for _ in range(rng.randint(1, 3)):
        at = rng.choice(list(_paths(body)))
        roll = rng.random()
        if roll < 0.45:
            body = _set(body, at, copy.deepcopy(rng.choice(POOL)))
        elif roll < 0.6 and at:
            holder = body
            for key in at[:-1]:
                holder = holder[key]
            del holder[at[-1]]
        elif roll < 0.75 and isinstance(body, dict):
            body[rng.choice(KEYS)] = copy.deepcopy(rng.choice(POOL))
        elif roll < 0.85:
            body = _set(body, at, [copy.deepcopy(rng.choice(POOL))] if rng.random() < 0.5 else {"k": 1})
        if not isinstance(body, (dict, list)):
            break
    raw = json.dumps(body).encode()
    roll = rng.random()
    if roll < 0.08:
        raw = raw[:rng.randrange(len(raw) + 1)]
    elif roll < 0.14:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    elif roll < 0.18:
        i = rng.randrange(len(raw))
        raw = raw[:i] + b"\xff\xc3" + raw[i:]
    return (CHAT if is_chat else COMPLETIONS), raw


def test_randomly_mutated_bodies_never_get_a_5xx_or_an_unended_stream(targets):
    rng = random.Random(20260)
    problems: list = []
    statuses: set[int] = set()
    sent = 0
    for sent in range(1, 301):  # bounded by count; each reply by REPLY_DEADLINE
        target = targets[rng.choice(TARGETS)]
        path, raw = mutated(rng)
        raw = raw.replace(b'"$MODEL"', json.dumps(target.model).encode())
        try:
            reply = send(target.url + path, content=raw, headers={"content-type": "application/json"})
            statuses.add(reply.status)
            check(reply, "any")
        except AssertionError as exc:
            problems.append((target.name, path, raw[:300], str(exc)[:300]))
        except httpx.HTTPError as exc:
            problems.append((target.name, path, raw[:300], repr(exc)[:300]))
    for target in targets.values():
        still_serving(target)
    assert not problems, f"{len(problems)} of {sent} requests broke the rule:\n" + "\n".join(map(repr, problems))
    assert 200 in statuses and 400 in statuses, statuses  # it did test both sides
