"""KV events on ZMQ: wire format, replay, and rebuilding the cache from events."""

from __future__ import annotations

import time

import msgspec
import openai
import pytest
import zmq

from dynamo.backends.mocker.kv_cache import chain_block_hashes

TOPIC = b"kv@mock"
END = 2**64 - 1


def apply(events: list[dict], cache: set[int], block_size: int) -> None:
    """What a router does with one batch: BlockStored adds, BlockRemoved drops."""
    for ev in events:
        kind = ev["type"]
        if kind == "BlockStored":
            assert ev["block_size"] == block_size
            assert set(ev) >= {"block_hashes", "parent_block_hash", "token_ids", "lora_id", "medium", "lora_name"}
            # The router can recompute every hash from the token ids and the parent.
            assert chain_block_hashes(ev["token_ids"], block_size, ev["parent_block_hash"]) == ev["block_hashes"]
            cache.update(ev["block_hashes"])
        elif kind == "BlockRemoved":
            assert ev["medium"] == "GPU"
            for h in ev["block_hashes"]:
                cache.remove(h)
        elif kind == "AllBlocksCleared":
            cache.clear()
        else:  # pragma: no cover
            raise AssertionError(f"unknown event {ev}")


def replay(ctx: zmq.Context, endpoint: str, start: int) -> list[tuple[int, list]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    while True:
        empty, topic, seq, payload = dealer.recv_multipart()
        assert empty == b""
        n = int.from_bytes(seq, "big")
        if n == END:
            assert topic == b"" and payload == b""
            break
        assert topic == TOPIC
        ts, events, rank = msgspec.msgpack.decode(payload)
        out.append((n, events))
    dealer.close()
    return out


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_subscriber_rebuilds_the_cached_block_set(start_mocker, zctx, get_json, free_port):
    pub, rep = free_port(), free_port()
    m = start_mocker(
        "--speedup-ratio", "0", "--block-size", "4", "--num-gpu-blocks", "40",
        "--kv-events-endpoint", f"tcp://127.0.0.1:{pub}",
        "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{rep}",
        "--kv-events-topic", TOPIC.decode(),
    )
    sources = get_json(m.url + "/kv_event_sources")
    assert sources["0"]["endpoint"] == f"tcp://127.0.0.1:{pub}"

    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(f"tcp://127.0.0.1:{pub}")
    time.sleep(0.3)  # ZMQ slow joiner: let the subscription reach the publisher

    c = openai.OpenAI(base_url=m.url + "/v1", api_key="x", max_retries=0)
    shared = list(range(50, 74))  # 6 blocks shared by every prompt
    for i in range(12):  # enough distinct suffixes to force evictions in 40 blocks
        c.completions.create(model="mock", prompt=shared + list(range(100 + 30 * i, 124 + 30 * i)), max_tokens=9)

    # Live stream; a subscriber that joined late fills the gap from the replay socket.
    received: dict[int, list] = {}
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    final_seq = get_json(m.url + "/debug/kv")["kv_events_next_seq"]
    while final_seq - 1 not in received:
        assert poller.poll(5000), "event stream stalled"
        frames = sub.recv_multipart()
        assert len(frames) == 3
        topic, seq, payload = frames
        assert topic == TOPIC and len(seq) == 8
        ts, events, rank = msgspec.msgpack.decode(payload)  # [ts, events, dp_rank]
        assert isinstance(ts, float) and rank == 0 and events
        received[int.from_bytes(seq, "big")] = events
    first_live = min(received)
    live_seqs = sorted(received)
    assert live_seqs == list(range(first_live, final_seq))  # consecutive, no gaps
    for n, events in replay(zctx, f"tcp://127.0.0.1:{rep}", 0):
        if n < first_live:
            received[n] = events
    assert sorted(received) == list(range(final_seq))  # numbered from 0
    live: set[int] = set()
    saw_removed = False
    for n in range(final_seq):
        saw_removed |= any(e["type"] == "BlockRemoved" for e in received[n])
        apply(received[n], live, 4)

    state = get_json(m.url + "/debug/kv")
    assert saw_removed and state["num_evictions"] > 0
    assert live == set(state["cached_block_hashes"])
    assert set(chain_block_hashes(shared, 4)) <= live  # the hot prefix survived LRU eviction

    # Replay from 0 rebuilds the same set; replay from the middle returns the tail.
    batches = replay(zctx, f"tcp://127.0.0.1:{rep}", 0)
    assert [n for n, _ in batches] == list(range(final_seq))
    rebuilt: set[int] = set()
    for _, events in batches:
        apply(events, rebuilt, 4)
    assert rebuilt == live
    assert [n for n, _ in replay(zctx, f"tcp://127.0.0.1:{rep}", final_seq - 2)] == [final_seq - 2, final_seq - 1]

    # Resetting the idle prefix cache publishes AllBlocksCleared.
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(m.url + "/reset_prefix_cache", data=b"", method="POST"), timeout=5)
    assert poller.poll(5000)
    _, _, payload = sub.recv_multipart()
    assert msgspec.msgpack.decode(payload)[1] == [{"type": "AllBlocksCleared"}]
    assert get_json(m.url + "/debug/kv")["cached_block_hashes"] == []


def test_events_are_msgpack_maps_with_unsigned_hashes(start_mocker, zctx, free_port):
    pub, rep = free_port(), free_port()
    m = start_mocker("--speedup-ratio", "0", "--kv-events-endpoint", f"tcp://127.0.0.1:{pub}",
                     "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{rep}")
    openai.OpenAI(base_url=m.url + "/v1", api_key="x").completions.create(
        model="mock", prompt=list(range(10, 42)), max_tokens=1
    )
    # Batch 0, fetched raw through the replay socket (no slow-joiner race).
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(f"tcp://127.0.0.1:{rep}")
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    empty, topic, seq, payload = dealer.recv_multipart()
    assert empty == b"" and topic == b"" and seq == (0).to_bytes(8, "big")
    # Raw msgpack check: array of 3, events are maps tagged with "type".
    assert payload[0] == 0x93
    ts, events, rank = msgspec.msgpack.decode(payload)
    stored = events[0]
    assert list(stored)[0] == "type" and stored["type"] == "BlockStored"
    assert stored["parent_block_hash"] is None and stored["token_ids"] == list(range(10, 42))
    assert stored["block_hashes"] == chain_block_hashes(list(range(10, 42)), 16)
    assert stored["medium"] == "GPU" and stored["lora_id"] is None and stored["lora_name"] is None
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in stored["block_hashes"])
    assert dealer.recv_multipart() == [b"", b"", END.to_bytes(8, "big"), b""]
    dealer.close(linger=0)


def test_no_events_without_prefix_caching(start_mocker, zctx, get_json, free_port):
    pub = free_port()
    m = start_mocker("--speedup-ratio", "0", "--no-enable-prefix-caching", "--kv-events-endpoint", f"tcp://127.0.0.1:{pub}")
    openai.OpenAI(base_url=m.url + "/v1", api_key="x").completions.create(
        model="mock", prompt=list(range(10, 74)), max_tokens=3
    )
    state = get_json(m.url + "/debug/kv")
    assert state["kv_events_next_seq"] == 0 and state["cached_block_hashes"] == []
