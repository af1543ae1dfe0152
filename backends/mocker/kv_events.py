"""KV-cache events in vLLM 0.32's ZMQ wire format.

Live stream (PUB, bound by the mocker): every message has three frames
``[topic, seq, payload]`` where ``seq`` is an 8-byte big-endian counter that
starts at 0 and ``payload`` is the msgpack array ``[ts, events, dp_rank]``.
Events are msgpack maps tagged by ``"type"`` (``BlockStored``,
``BlockRemoved``, ``AllBlocksCleared``); hashes are unsigned 64-bit ints.

Replay (ROUTER, bound): a request ``[identity, "", seq8]`` is answered with
one ``[topic, seq8, payload]`` per buffered batch whose sequence number is at
least ``seq8``, then the end marker ``["", 0xFFFFFFFFFFFFFFFF, ""]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import msgspec
import zmq
import zmq.asyncio

__all__ = ["KvEventPublisher", "KvEventsError", "END_OF_REPLAY", "decode_batch"]

log = logging.getLogger("dynamo.mocker.kv_events")

END_OF_REPLAY = (2**64 - 1).to_bytes(8, "big")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class KvEventsError(Exception):
    """A KV-events socket could not be bound."""


def decode_batch(payload: bytes) -> tuple[float, list[dict], int]:
    """Decode one payload frame into ``(ts, events, dp_rank)``."""
    ts, events, rank = _decode(payload)
    return ts, events, rank


class KvEventPublisher:
    """Publishes event batches on a bound PUB socket and serves replays on a ROUTER."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "",
        *,
        dp_rank: int = 0,
        buffer_steps: int = 10000,
        hwm: int = 100000,
    ) -> None:
        self.topic = topic.encode()
        self.dp_rank = dp_rank
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context.shadow(self._ctx)
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task | None = None
        current = endpoint
        try:
            self._pub.bind(endpoint)
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
            self.replay_endpoint: str | None = None
            if replay_endpoint:
                current = replay_endpoint
                self._router = self._actx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self._router.bind(replay_endpoint)
                self.replay_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            self.close()
            raise KvEventsError(f"cannot bind KV events socket {current}: {exc}") from None

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, events: list[dict]) -> None:
        """Send one batch (never blocks: a full PUB queue drops, as ZMQ PUB does)."""
        payload = _encode((time.time(), events, self.dp_rank))
        seq = self._seq
        self._seq = seq + 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload), flags=zmq.NOBLOCK)
        except zmq.Again:  # pragma: no cover - only past the high-water mark
            pass

    def start(self) -> None:
        """Start serving replay requests on the running event loop."""
        if self._router is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def _serve_replay(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("ignoring malformed replay request with %d frames", len(frames))
                continue
            identity = frames[0]
            start = int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart((identity, b"", self.topic, seq.to_bytes(8, "big"), payload))
            await router.send_multipart((identity, b"", b"", END_OF_REPLAY, b""))

    def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            self._replay_task = None
        for sock in (self._router, self._pub):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        self._ctx.term()
