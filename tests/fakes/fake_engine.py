"""A fake engine for supervisor tests: a tiny OpenAI-ish HTTP server with failure modes.

    python fake_engine.py --port P [--exit-at-once CODE] [--never-ready] [--ready-after S]
                          [--escape-port Q] [--ignore-sigterm] [--print-ready]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def escape(port: int) -> None:
    """Double-fork a grandchild into a new session that holds ``port`` (like an engine core)."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--exit-at-once", type=int, default=None)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--escape-port", type=int, default=None)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--model", default="fake")
    args = parser.parse_args()
    print(f"fake engine pid {os.getpid()} starting", flush=True)
    if args.exit_at_once is not None:
        print("fake engine exiting at once", flush=True)
        sys.exit(args.exit_at_once)
    if args.escape_port:
        escape(args.escape_port)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            ready = not args.never_ready and time.monotonic() - started >= args.ready_after
            if self.path == "/health":
                self._send(200 if ready else 503, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": args.model, "object": "model"}]})
            else:
                self._send(404, {})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": f"pid {os.getpid()}"},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"fake engine listening on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
