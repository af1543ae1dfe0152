"""The KV-aware router process: owns the KV index, answers routing requests over NATS.

- Watches discovery for the namespace's workers and subscribes to each worker's KV events
  (vLLM's ZMQ wire format; replays missed batches from the worker's replay socket).
- ``<ns>.router.route`` (request/reply, JSON): ``{"request_id", "hashes", "pool"}`` →
  ``{"worker", "url", "overlap", "cost"}``; the decision is counted as load on that worker.
- ``<ns>.router.load`` (publish, JSON): ``{"event": "first_token"|"finished", "request_id"}``.
- ``<ns>.router.stats`` (request/reply): index size, events applied, decisions.
- Workers that publish no events are routed in approximate mode: the router assumes the
  worker it picked now holds the request's blocks, for ``--approx-ttl`` seconds.

Run as ``python -m dynamo.core.router --nats-url URL --namespace NAME --block-size 16``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import struct

import msgspec
import zmq
import zmq.asyncio

from dynamo.core.discovery import DEFAULT_TTL, DiscoveryWatcher, Instance, connect
from dynamo.core.kv_index import KvIndex
from dynamo.core.nats_server import NATS_URL_ENV
from dynamo.core.routing import DEFAULT_OVERLAP_WEIGHT, WorkerLoad, kv_cost, pick_lowest

_SEQ = struct.Struct(">Q")
_END_OF_REPLAY = 0xFFFFFFFFFFFFFFFF
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()
_msgpack = msgspec.msgpack.Decoder()

POOLS = {"agg": ("agg", "decode"), "decode": ("decode", "agg"), "prefill": ("prefill",)}


def route_subject(namespace: str) -> str:
    return f"{namespace}.router.route"


def load_subject(namespace: str) -> str:
    return f"{namespace}.router.load"


def stats_subject(namespace: str) -> str:
    return f"{namespace}.router.stats"


def apply_batch(index: KvIndex, worker: str, payload: bytes) -> None:
    """Apply one vLLM/SGLang KV event batch ``[ts, events, dp_rank]`` to the index.

    Events are maps with a ``type`` key (vLLM ≥ 0.32, SGLang) or arrays whose first item is
    the tag (older vLLM).
    """
    batch = _msgpack.decode(payload)
    events = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else []
    for event in events:
        if isinstance(event, dict):
            kind = event.get("type")
            if kind == "BlockStored":
                index.stored(worker, event.get("block_hashes") or [], event.get("parent_block_hash"),
                             event.get("token_ids") or [], event.get("block_size"))
            elif kind == "BlockRemoved":
                index.removed(worker, event.get("block_hashes") or [])
            elif kind == "AllBlocksCleared":
                index.cleared(worker)
        elif isinstance(event, (list, tuple)) and event:
            kind = event[0]
            if kind == "BlockStored" and len(event) >= 5:
                index.stored(worker, event[1] or [], event[2], event[3] or [], event[4])
            elif kind == "BlockRemoved":
                index.removed(worker, event[1] or [])
            elif kind == "AllBlocksCleared":
                index.cleared(worker)


class EventFeed:
    """One worker's KV events: a SUB socket, with replay on connect and on sequence gaps."""

    def __init__(self, ctx: zmq.asyncio.Context, router: Router, worker: Instance):
        self.ctx = ctx
        self.router = router
        self.key = worker.key
        self.endpoint = worker.data["kv_events"]
        self.replay_endpoint = worker.data.get("kv_replay")
        self.next_seq: int | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)
        try:
            await self._replay(0)
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = _SEQ.unpack(frames[1])[0]
                if self.next_seq is not None and seq < self.next_seq:
                    continue  # already applied through replay
                if self.next_seq is not None and seq > self.next_seq:
                    await self._replay(self.next_seq)
                    if seq < self.next_seq:
                        continue
                self._apply(seq, frames[2])
        except asyncio.CancelledError:
            pass
        finally:
            sub.close()

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            apply_batch(self.router.index, self.key, payload)
        except (msgspec.DecodeError, TypeError, ValueError):
            self.router.bad_batches += 1
        self.next_seq = seq + 1
        self.router.batches += 1

    async def _replay(self, start: int) -> None:
        if not self.replay_endpoint:
            return
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            await dealer.send_multipart([b"", _SEQ.pack(start)])
            while True:
                frames = await asyncio.wait_for(dealer.recv_multipart(), 2.0)
                frames = frames[1:] if frames and frames[0] == b"" else frames
                if len(frames) < 3:
                    break
                seq = _SEQ.unpack(frames[1])[0]
                if seq == _END_OF_REPLAY:
                    break
                if self.next_seq is None or seq >= self.next_seq:
                    self._apply(seq, frames[2])
        except asyncio.TimeoutError:
            pass
        finally:
            dealer.close()

    def close(self) -> None:
        self.task.cancel()


def apply_trtllm_events(index: KvIndex, worker: str, events: list) -> None:
    """Apply TensorRT-LLM's JSON KV events (``POST /kv_cache_events``): stored, removed."""
    for envelope in events:
        data = envelope.get("data") if isinstance(envelope, dict) else None
        if not isinstance(data, dict):
            continue
        kind = data.get("type")
        if kind == "stored":
            blocks = data.get("blocks") or []
            hashes = [b.get("block_hash") for b in blocks]
            tokens = [t.get("token_id") for b in blocks for t in (b.get("tokens") or [])]
            size = len(blocks[0].get("tokens") or []) if blocks else None
            if hashes and size:
                index.stored(worker, hashes, data.get("parent_hash"), tokens, size)
        elif kind == "removed":
            index.removed(worker, data.get("block_hashes") or [])


class HttpEventFeed:
    """TensorRT-LLM publishes no ZMQ events: drain its ``/kv_cache_events`` endpoint periodically."""

    def __init__(self, router: Router, worker: Instance, period: float = 0.5):
        self.router = router
        self.key = worker.key
        self.url = worker.data["kv_events"]
        self.period = period
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(trust_env=False) as session:
            while True:
                try:
                    async with session.post(self.url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        events = await resp.json(content_type=None) if resp.status == 200 else []
                    if isinstance(events, list) and events:
                        apply_trtllm_events(self.router.index, self.key, events)
                        self.router.batches += 1
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.router.bad_batches += 1
                await asyncio.sleep(self.period)

    def close(self) -> None:
        self.task.cancel()


class Router:
    def __init__(self, namespace: str, block_size: int, overlap_weight: float = DEFAULT_OVERLAP_WEIGHT, temperature: float = 0.0,
                 use_events: bool = True, approx_ttl: float = 120.0, rng: random.Random | None = None,
                 step_tokens: int = 0):
        self.namespace = namespace
        self.index = KvIndex(block_size)
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.use_events = use_events
        self.approx_ttl = approx_ttl
        self.step_blocks = step_tokens // block_size  # 0: the whole prefill queue counts (Dynamo's formula)
        self.pending_ttl = 10.0
        self.rng = rng or random.Random()
        self.loads: dict[str, WorkerLoad] = {}
        self.owner: dict[str, str] = {}  # request id -> worker key
        self.workers: dict[str, Instance] = {}
        self.feeds: dict[str, EventFeed] = {}
        self.decisions = 0
        self.batches = 0
        self.bad_batches = 0
        self.ctx = zmq.asyncio.Context.instance()

    # ------------------------------------------------------------ membership

    def sync(self, instances: dict[str, Instance]) -> None:
        for key in list(self.workers):
            if key not in instances:
                del self.workers[key]
                feed = self.feeds.pop(key, None)
                if feed:
                    feed.close()
                self.index.remove_worker(key)
                self.loads.pop(key, None)
        for key, inst in instances.items():
            if key not in self.workers:
                self.workers[key] = inst
                self.loads.setdefault(key, WorkerLoad())
                if self.use_events and inst.data.get("kv_events"):
                    if inst.data.get("kv_format") == "trtllm-http":
                        self.feeds[key] = HttpEventFeed(self, inst)
                    else:
                        self.feeds[key] = EventFeed(self.ctx, self, inst)

    # ------------------------------------------------------------ decisions

    def route(self, request_id: str, hashes: list[int], pool: str, account: bool = True) -> dict:
        """Pick the cheapest worker of ``pool``; unless ``account`` is false, count the request on it."""
        roles = POOLS.get(pool, ("agg",))
        candidates = [w for w in self.workers.values() if w.role in roles]
        if not candidates:
            return {"error": f"no {pool} worker"}
        self.index.expire()
        overlaps = self.index.overlap(hashes)
        request_blocks = len(hashes)
        costs = {}
        for w in candidates:
            load, overlap = self.loads[w.key], overlaps.get(w.key, 0)
            costs[w.key] = kv_cost(request_blocks, overlap, load.active_blocks, self.overlap_weight,
                                   load.queued_prefill_blocks(hashes, overlap, self.step_blocks))
        chosen = pick_lowest(costs, self.temperature, self.rng, overlaps)
        overlap = overlaps.get(chosen, 0)
        if not account:
            return {"worker": chosen, "url": self.workers[chosen].url, "overlap": overlap, "cost": costs[chosen]}
        if request_id in self.owner:  # the frontend's ids are unique; another caller may reuse one, and
            self.load_event("finished", request_id)  # the first would otherwise hold its load forever
        self.loads[chosen].add(request_id, request_blocks, request_blocks - overlap, hashes[overlap:])
        self.owner[request_id] = chosen
        # Without events the prediction is all we know; with events it bridges until they arrive.
        self.index.predict(chosen, hashes, self.approx_ttl if chosen not in self.feeds else self.pending_ttl)
        self.decisions += 1
        return {"worker": chosen, "url": self.workers[chosen].url, "overlap": overlap, "cost": costs[chosen]}

    def load_event(self, event: str, request_id: str) -> None:
        worker = self.owner.get(request_id)
        if worker is None or worker not in self.loads:
            self.owner.pop(request_id, None)
            return
        if event == "first_token":
            self.loads[worker].first_token(request_id)
        elif event == "finished":
            self.loads[worker].finish(request_id)
            del self.owner[request_id]

    def stats(self) -> dict:
        return {
            "workers": sorted(self.workers), "event_feeds": sorted(self.feeds), "indexed_blocks": self.index.total_blocks,
            "blocks_per_worker": {k: self.index.block_count(k) for k in self.workers},
            "events_applied": self.index.events_applied, "batches": self.batches, "bad_batches": self.bad_batches,
            "decisions": self.decisions,
            "active_blocks": {k: load.active_blocks for k, load in self.loads.items()},
        }


async def serve(args: argparse.Namespace) -> None:
    router = Router(args.namespace, args.block_size, args.overlap_weight, args.temperature,
                    not args.no_kv_events, args.approx_ttl, step_tokens=args.step_tokens)
    nc = await connect(args.nats_url, "dynamo-router", timeout=10.0)
    watcher = DiscoveryWatcher(nc, args.namespace, args.discovery_ttl)
    watcher.on_change = lambda: router.sync(dict(watcher.instances))
    await watcher.start()

    async def on_route(msg) -> None:
        try:
            body = _decode.decode(msg.data)
            reply = router.route(str(body.get("request_id", "")), list(body.get("hashes", [])), body.get("pool", "agg"),
                                 bool(body.get("account", True)))
        except (msgspec.DecodeError, AttributeError, TypeError, ValueError) as exc:
            reply = {"error": f"bad routing request: {exc}"}
        await msg.respond(_json.encode(reply))

    async def on_load(msg) -> None:
        try:
            body = _decode.decode(msg.data)
            router.load_event(body.get("event", ""), str(body.get("request_id", "")))
        except (msgspec.DecodeError, AttributeError):
            pass

    async def on_stats(msg) -> None:
        await msg.respond(_json.encode(router.stats()))

    await nc.subscribe(route_subject(args.namespace), cb=on_route)
    await nc.subscribe(load_subject(args.namespace), cb=on_load)
    await nc.subscribe(stats_subject(args.namespace), cb=on_stats)
    await nc.flush()
    print(f"router ready (namespace {args.namespace}, block size {args.block_size}, "
          f"overlap weight {args.overlap_weight}, temperature {args.temperature}, "
          f"kv events {'off' if args.no_kv_events else 'on'})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for feed in router.feeds.values():
        feed.close()
    await watcher.close()
    await nc.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynamo.core.router", description=__doc__.split("\n")[0])
    parser.add_argument("--nats-url", default=os.environ.get(NATS_URL_ENV), required=not os.environ.get(NATS_URL_ENV),
                        help=f"NATS server URL (default: ${NATS_URL_ENV}, which keeps a token off the command line)")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--overlap-weight", type=float, default=DEFAULT_OVERLAP_WEIGHT)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-kv-events", action="store_true", help="Approximate mode for every worker.")
    parser.add_argument("--approx-ttl", type=float, default=120.0)
    parser.add_argument("--step-tokens", type=int, default=8192,
                        help="Prefill tokens an engine batches into one step: queued prefill beyond it counts.")
    parser.add_argument("--discovery-ttl", type=float, default=DEFAULT_TTL)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
