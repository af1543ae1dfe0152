"""Fixtures for the bench tests: a tiny OpenAI-like server with failure modes, the mocker, and a
local tokenizer. Every process is started on 127.0.0.1 and killed at teardown, even on failure.

This file doubles as the fake server: ``python conftest.py --port P [options]`` (see ``serve_fake``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()

# ----------------------------------------------------------------------------- the fake server


def serve_fake(argv: list[str] | None = None) -> None:
    """An OpenAI-compatible streaming server with an exact timing model and failure modes.

    Each request: sleep --ttft-ms, send the first chunk, then every --itl-ms one chunk of
    --tokens-per-chunk tokens (" tok" words). Every Nth request (counted over both endpoints)
    can fail: --error-every (HTTP 500), --drop-every (connection closed mid-stream),
    --drop-early-every (closed before any response), --stall-every (stops sending).
    """
    from aiohttp import web

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--no-usage", action="store_true", help="never send usage")
    p.add_argument("--reject-continuous", action="store_true", help="400 on continuous_usage_stats")
    p.add_argument("--reject-field", action="append", default=[], metavar="NAME",
                   help="400 naming NAME when a body has that field, as servers refusing unknown fields do")
    p.add_argument("--role-chunk", action="store_true", help="send a role-only chunk first (chat)")
    p.add_argument("--error-every", type=int, default=0)
    p.add_argument("--drop-every", type=int, default=0)
    p.add_argument("--drop-early-every", type=int, default=0)
    p.add_argument("--stall-every", type=int, default=0)
    p.add_argument("--log", default=None, help="append one JSON line per request body here")
    p.add_argument("--api-key", default=None, help="answer 401 on /v1 without 'Authorization: Bearer KEY'")
    a = p.parse_args(argv)
    count = {"n": 0}

    async def models(_req):
        return web.json_response({"object": "list", "data": [{"id": a.model, "object": "model"}]})

    async def health(_req):
        return web.Response(text="ok")

    def every(n: int, k: int) -> bool:
        return n > 0 and k > 0 and k % n == 0

    async def complete(req: web.Request):
        body = await req.json()
        chat = req.path.endswith("/chat/completions")
        if a.log:
            with open(a.log, "a") as f:
                f.write(json.dumps(body) + "\n")
        opts = body.get("stream_options") or {}
        if a.reject_continuous and opts.get("continuous_usage_stats"):
            return web.json_response({"error": {"message": "unknown field continuous_usage_stats"}}, status=400)
        for name in a.reject_field:
            if name in body:
                return web.json_response({"error": {"message": f"1 validation error: {name}: extra inputs are "
                                                    "not permitted"}}, status=400)
        if body.get("max_tokens", 0) == 1:  # readiness probe: never counted, never failed
            k = 0
        else:
            count["n"] += 1
            k = count["n"]
        if every(a.error_every, k):
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        if every(a.drop_early_every, k):
            req.transport.abort()
            return web.Response()
        n_out = int(body.get("max_tokens") or 16)
        prompt = body.get("prompt") if not chat else " ".join(m["content"] for m in body["messages"])
        n_in = len(str(prompt).split())
        if not body.get("stream"):
            await asyncio.sleep((a.ttft_ms + a.itl_ms * (n_out - 1)) / 1000)
            text = " tok" * n_out
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return web.json_response({"choices": [choice], "usage": {"prompt_tokens": n_in, "completion_tokens": n_out}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        continuous = opts.get("continuous_usage_stats") and not a.no_usage

        async def send(obj) -> None:
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        if chat and a.role_chunk:
            first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            if continuous:
                first["usage"] = {"prompt_tokens": n_in, "completion_tokens": 0}
            await send(first)
        await asyncio.sleep(a.ttft_ms / 1000)
        sent = 0
        chunk_no = 0
        t_first = time.perf_counter()
        while sent < n_out:
            if chunk_no > 0:
                # Sleep until this chunk's due time so delays do not accumulate.
                due = t_first + chunk_no * a.itl_ms / 1000
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            m = min(1 if chunk_no == 0 else a.tokens_per_chunk, n_out - sent)
            sent += m
            text = " tok" * m
            fin = "length" if sent >= n_out else None
            choice = {"index": 0, "finish_reason": fin}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            obj = {"choices": [choice]}
            if continuous:
                obj["usage"] = {"prompt_tokens": n_in, "completion_tokens": sent}
            await send(obj)
            chunk_no += 1
            if chunk_no == 2 and every(a.drop_every, k):
                req.transport.abort()
                return resp
            if chunk_no == 2 and every(a.stall_every, k):
                await asyncio.sleep(3600)
        if opts.get("include_usage") and not a.no_usage:
            await send({"choices": [], "usage": {"prompt_tokens": n_in, "completion_tokens": n_out}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @web.middleware
    async def auth(req: web.Request, handler):
        if a.api_key and req.path.startswith("/v1/") and req.headers.get("Authorization") != f"Bearer {a.api_key}":
            return web.json_response({"error": {"message": "invalid or missing API key",
                                                "type": "authentication_error"}}, status=401)
        return await handler(req)

    app = web.Application(middlewares=[auth])
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", a.port)
        await site.start()
        print(f"fake server ready on http://127.0.0.1:{a.port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())


if __name__ == "__main__":
    serve_fake()
    sys.exit(0)

# ----------------------------------------------------------------------------- fixtures

import pytest  # noqa: E402  (the server above must not need pytest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A background process whose output goes to a file; killed with its process group."""

    def __init__(self, argv: list[str], log: Path, ready: str, timeout: float = 30.0):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while ready not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[2:4]} exited ({self.proc.returncode}):\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{argv[2:4]} not ready after {timeout}s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


@pytest.fixture
def fake_server(tmp_path):
    """``fake_server(*args) -> base URL``: start the fake OpenAI server with these options."""
    procs: list[Proc] = []

    def start(*args: str) -> str:
        port = free_port()
        procs.append(Proc([sys.executable, str(HERE), "--port", str(port), *args],
                          tmp_path / f"fake{len(procs)}.log", "fake server ready"))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.kill()


MOCKER_MAIN = HERE.parents[2] / "backends" / "mocker" / "__main__.py"


@pytest.fixture
def mocker(tmp_path):
    """``mocker(*args) -> base URL``: start ``python -m dynamo.backends.mocker`` on a free port."""
    if not MOCKER_MAIN.exists():
        pytest.skip("the mocker backend (backends/mocker/__main__.py) is not there yet")
    procs: list[Proc] = []

    def start(*args: str, model: str = "mock-model") -> str:
        port = free_port()
        procs.append(Proc([sys.executable, "-m", "dynamo.backends.mocker", "--host", "127.0.0.1", "--port", str(port),
                           "--served-model-name", model, *args],
                          tmp_path / f"mocker{len(procs)}.log", "Mocker ready on", timeout=60))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.kill()


def _words() -> list[str]:
    cons, vows = "bcdfghklmnprstvz", "aeiou"
    return [c1 + v + c2 for c1 in cons for v in vows for c2 in cons][:1500]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny word-level tokenizer.json: every word is one token, so retokenizing text is exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tok")
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "</s>": 3, "a": 4}
    for w in _words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return d


def run_bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run ``dynamo bench ARGS`` in a new process (python -m dynamo.cli.bench), as a user would."""
    return subprocess.run([sys.executable, "-m", "dynamo.cli.bench", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def run_bench_here(*args: str) -> subprocess.CompletedProcess:
    """Run the bench command in this process (same code path, without ~2 s of imports per run)."""
    from typer.testing import CliRunner

    from dynamo.cli.bench import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(["dynamo", "bench", *args], result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def bench():
    """``bench(*args)``: run ``dynamo bench`` and return a CompletedProcess (returncode, stdout, stderr)."""
    return run_bench_here


@pytest.fixture
def bench_process():
    """Like ``bench`` but in a separate Python process."""
    return run_bench
