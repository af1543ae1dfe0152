"""``python -m dynamo.backends.mocker``: run one simulated vLLM-compatible engine.

Exit codes: 0 after SIGTERM/SIGINT, 2 for bad flags, when the port / KV
events endpoint cannot be bound or ``--kv-transfer nixl`` cannot start (one
line on stderr), 1 for anything else.
"""

from __future__ import annotations

import signal
import sys


def _exit_now(signum, frame):  # SIGTERM before the event loop owns signals
    raise SystemExit(0)


if __name__ == "__main__":  # as early as possible: the launcher may stop us while we import
    signal.signal(signal.SIGTERM, _exit_now)

import argparse  # noqa: E402
import os  # noqa: E402

from .config import KV_TRANSFER_MODES, MockerConfig  # noqa: E402

ROLES = ("agg", "prefill", "decode")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be within 0-65535, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = _non_negative_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError("expected a number > 0")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _zmq_endpoint(text: str) -> str:
    if not text.startswith(("tcp://", "ipc://", "inproc://")):
        raise argparse.ArgumentTypeError(f"expected a ZMQ endpoint like tcp://127.0.0.1:5557, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dynamo.backends.mocker",
        description="Simulated vLLM engine: OpenAI HTTP API, paged KV cache with prefix caching, "
        "continuous batching, a timing model, vLLM KV events and P/D disaggregation.",
        allow_abbrev=False,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=_port, required=True, help="HTTP port to bind (0 picks a free one)")
    p.add_argument("--served-model-name", required=True, help="model name clients must use")
    p.add_argument("--model-path", help="directory with tokenizer.json, and optionally tokenizer_config.json "
                   "(chat_template, eos_token) or chat_template.jinja; default: a built-in tokenizer that needs "
                   "no files")
    p.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV block (default: %(default)s)")
    p.add_argument("--num-gpu-blocks", type=_positive_int, default=16384, help="KV blocks in the pool (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=256, help="max requests per step (default: %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=8192,
                   help="token budget per step (default: %(default)s)")
    p.add_argument("--max-model-len", type=_positive_int, default=32768, help="context length (default: %(default)s)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached prompt blocks (default: on)")
    p.add_argument("--speedup-ratio", type=_non_negative_float, default=1.0,
                   help="divide simulated step times by this; 0 = no simulated delay (default: %(default)s)")
    p.add_argument("--perf-table", help="JSON file of measured points: "
                   '{"prefill": [[tokens, ms], ...], "decode": [[kv_usage, ms], ...]}')
    p.add_argument("--startup-time", type=_non_negative_float, default=0.0,
                   help="seconds /health answers 503 before the mocker becomes ready (default: %(default)s)")
    p.add_argument("--seed", type=_int, default=0, help="server seed for requests without one (default: %(default)s)")
    p.add_argument("--role", choices=ROLES, default="agg", help="agg, prefill or decode (default: %(default)s)")
    p.add_argument("--kv-events-endpoint", type=_zmq_endpoint,
                   help="bind a ZMQ PUB socket here and publish vLLM KV events, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--kv-events-replay-endpoint", type=_zmq_endpoint,
                   help="bind a ZMQ ROUTER here that replays buffered event batches")
    p.add_argument("--kv-events-topic", default="", help="topic frame of every event message (default: empty)")
    p.add_argument("--kv-transfer-bandwidth-gbps", type=_positive_float, default=25.0,
                   help="simulated KV transfer bandwidth in gigabits/s (default: %(default)s)")
    p.add_argument("--kv-bytes-per-token", type=_positive_int, default=131072,
                   help="KV bytes per token: for modelled transfer times, and the size of a token's "
                   "slot in the host KV pool with --kv-transfer nixl (default: %(default)s)")
    p.add_argument("--kv-transfer", choices=KV_TRANSFER_MODES, default="model",
                   help="how prefill -> decode KV moves: model (wait the modelled time) or nixl (real "
                   "bytes in host memory over NIXL/UCX; needs the nixl extra) (default: %(default)s)")
    return p


def parse_args(argv: list[str] | None = None) -> MockerConfig:
    """Parse and cross-check flags; exits 2 with an argparse message on error."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.kv_events_replay_endpoint and not a.kv_events_endpoint:
        parser.error("--kv-events-replay-endpoint needs --kv-events-endpoint")
    if not a.served_model_name.strip():
        parser.error("--served-model-name must not be empty")
    if a.model_path is not None and not os.path.isfile(os.path.join(a.model_path, "tokenizer.json")):
        parser.error(f"--model-path {a.model_path}: no tokenizer.json in that directory")
    if a.perf_table is not None and not os.path.isfile(a.perf_table):
        parser.error(f"--perf-table {a.perf_table}: no such file")
    if a.kv_transfer == "nixl" and a.role == "agg":
        parser.error("--kv-transfer nixl moves KV between --role prefill and --role decode workers")
    return MockerConfig(
        host=a.host,
        port=a.port,
        served_model_name=a.served_model_name,
        model_path=a.model_path,
        block_size=a.block_size,
        num_gpu_blocks=a.num_gpu_blocks,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        enable_prefix_caching=a.enable_prefix_caching,
        speedup_ratio=a.speedup_ratio,
        perf_table=a.perf_table,
        startup_time=a.startup_time,
        seed=a.seed,
        role=a.role,
        kv_events_endpoint=a.kv_events_endpoint,
        kv_events_replay_endpoint=a.kv_events_replay_endpoint,
        kv_events_topic=a.kv_events_topic,
        kv_transfer_bandwidth_gbps=a.kv_transfer_bandwidth_gbps,
        kv_bytes_per_token=a.kv_bytes_per_token,
        kv_transfer=a.kv_transfer,
    )


def _fail(message: str) -> int:
    print(f"mocker: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_now)
    try:
        return _run(cfg)
    except KeyboardInterrupt:  # Ctrl-C before the event loop owns signals
        return 0


def _run(cfg: MockerConfig) -> int:
    import asyncio
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from .server import StartupError, bind_socket, serve
    from .timing import PerfTableError, load_perf_model
    from dynamo.core.tokenizer import TokenizerError, load_tokenizer

    try:
        perf = load_perf_model(cfg.perf_table, cfg.speedup_ratio)
        tokenizer = load_tokenizer(cfg.model_path)
    except (PerfTableError, TokenizerError) as exc:
        return _fail(str(exc))
    kv_transfer = None
    if cfg.kv_transfer == "nixl":
        from .nixl_transfer import NixlSetupError, open_nixl_transfer

        try:
            kv_transfer = open_nixl_transfer(cfg)
        except NixlSetupError as exc:
            return _fail(str(exc))
    try:
        sock = bind_socket(cfg.host, cfg.port)
    except StartupError as exc:
        return _fail(str(exc))

    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(cfg, sock, tokenizer, perf, kv_transfer))
    except StartupError as exc:
        return _fail(str(exc))
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
