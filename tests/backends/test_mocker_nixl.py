"""``--kv-transfer nixl``: prefill and decode mockers move real KV bytes with NIXL over UCX.

The tests marked ``nixl`` need the environment made by ``bash scripts/nixl_setup.sh .venv-nixl``:

    .venv-nixl/bin/python -m pytest -m nixl tests/backends/test_mocker_nixl.py

and skip where nixl is not importable. The others (KV bytes, flags, the fallback, the
error without nixl) run in the main environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from dynamo.backends.mocker.__main__ import parse_args
from dynamo.backends.mocker.kv_cache import KvCache
from dynamo.backends.mocker.nixl_transfer import HostKvPool, token_kv_bytes
from dynamo.backends.mocker.scheduler import GenerationVocab, Scheduler, Sequence
from dynamo.core.hashing import chain_block_hashes

BLOCK = 16
TOKEN_BYTES = 64  # 1 KiB blocks: the pools are a few hundred KiB, not GiB
SMALL_POOL = ("--num-gpu-blocks", "512", "--kv-bytes-per-token", str(TOKEN_BYTES))
NIXL_FLAGS = ("--kv-transfer", "nixl", *SMALL_POOL)


@pytest.fixture
def nixl():
    """Skip unless nixl is importable (the environment of scripts/nixl_setup.sh)."""
    return pytest.importorskip("nixl", reason="nixl is not installed here: bash scripts/nixl_setup.sh .venv-nixl")


# ------------------------------------------------------------------ KV bytes
def test_token_bytes_are_a_function_of_the_prefix():
    a = token_kv_bytes(0, [5, 6, 7], 64)
    assert len(a) == 64 and a == token_kv_bytes(0, [5, 6, 7], 64)
    assert a != token_kv_bytes(0, [5, 6, 8], 64)  # the token itself
    assert a != token_kv_bytes(0, [4, 6, 7], 64)  # an earlier token of the block
    assert a != token_kv_bytes(1, [5, 6, 7], 64)  # an earlier block (the parent hash)
    assert len(token_kv_bytes(0, [1], 13)) == 13


def test_pool_writes_in_chunks_what_it_verifies_and_catches_foreign_bytes():
    tokens = list(range(100, 150))  # 3 full blocks and 2 tokens
    hashes = chain_block_hashes(tokens, BLOCK)
    pool = HostKvPool(8, BLOCK, TOKEN_BYTES)
    try:
        blocks = [5, 2, 7, 0]
        pool.write(blocks, tokens, hashes, 0, 20)  # chunked prefill: two steps
        pool.write(blocks, tokens, hashes, 20, 50)
        assert pool.bad_blocks(blocks, tokens, hashes, 0, 50) == 0
        assert pool.bad_blocks([5, 2, 7, 1], tokens, hashes, 0, 50) == 1  # block 1 was never written
        assert pool.bad_blocks([2, 5, 7, 0], tokens, hashes, 0, 50) == 2  # swapped blocks
        other = tokens[:40] + [9] + tokens[41:]
        assert pool.bad_blocks(blocks, other, chain_block_hashes(other, BLOCK), 0, 50) == 2  # block 2 and, via its hash, 3
        assert pool.size == 8 * BLOCK * TOKEN_BYTES and pool.address % 4096 == 0
    finally:
        pool.close()


# ---------------------------------------------------------------- flags, errors
def test_kv_transfer_flag_round_trips_and_is_for_prefill_and_decode_only(capsys):
    cfg = parse_args(["--port", "0", "--served-model-name", "m", "--role", "decode", *NIXL_FLAGS])
    assert cfg.kv_transfer == "nixl" and cfg.kv_bytes_per_token == TOKEN_BYTES
    assert parse_args(cfg.to_argv()) == cfg
    assert parse_args(["--port", "0", "--served-model-name", "m"]).kv_transfer == "model"
    with pytest.raises(SystemExit) as exc:
        parse_args(["--port", "0", "--served-model-name", "m", "--kv-transfer", "nixl"])
    assert exc.value.code == 2
    assert "--role prefill and --role decode" in capsys.readouterr().err


def test_profile_args_pass_kv_transfer_to_the_workers(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text(textwrap.dedent("""\
        name: p
        model: {name: m, block_size: 16}
        backend: mocker
        nats: {port: 0}
        frontend: {port: 0}
        ports: {base: 0}
        workers:
          prefill: {role: prefill, args: {kv-transfer: nixl, kv-bytes-per-token: 64, num-gpu-blocks: 512}}
          decode: {role: decode, args: {kv-transfer: nixl, kv-bytes-per-token: 64, num-gpu-blocks: 512}}
        """))
    out = subprocess.run([sys.executable, "-m", "dynamo.cli.app", "serve", str(profile), "--dry-run", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argvs = [" ".join(p["argv"]) for p in json.loads(out.stdout)["processes"] if "dynamo.backends.mocker" in p["argv"]]
    assert len(argvs) == 2 and all("--kv-transfer nixl" in a for a in argvs)


def _mocker_exit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynamo.backends.mocker", "--port", "0", "--served-model-name", "m", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


def test_nixl_without_the_package_exits_2_saying_how_to_install_it(tmp_path):
    # Where nixl is installed, a package that fails to import stands in for its absence.
    shadow = tmp_path / "shadow" / "nixl"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named nixl (hidden by the test)')\n")
    out = _mocker_exit("--role", "decode", *NIXL_FLAGS, env={"PYTHONPATH": str(shadow.parent)})
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("mocker: error: --kv-transfer nixl needs the nixl package")
    assert "dynamo-launcher[nixl]" in err and "torch==2.13.0" in err and "scripts/nixl_setup.sh" in err


def test_nixl_refuses_a_pool_larger_than_half_the_memory():
    # The defaults would be 16384 blocks x 16 tokens x 128 KiB = 32 GiB of host memory.
    out = _mocker_exit("--role", "prefill", "--kv-transfer", "nixl", "--num-gpu-blocks", str(1 << 22))
    assert out.returncode == 2
    assert "host KV pool" in out.stderr and "--kv-bytes-per-token" in out.stderr


# ---------------------------------------------------------------- fallback
def test_a_failed_transfer_computes_the_uncached_prompt_locally():
    kv = KvCache(16, BLOCK)
    sched = Scheduler(kv, GenerationVocab([10, 11], {10: "a", 11: "b"}, 1))
    seq = Sequence("r", list(range(40)), 4, seed=0, remote={"do_remote_prefill": True})
    sched.add(seq)
    batch = sched.schedule()
    assert batch.transfers == [seq] and not batch and len(seq.blocks) == 3
    assert sched.fail_transfer(seq) and not sched.fail_transfer(seq)
    batch = sched.schedule()
    assert batch.seqs == [seq] and batch.prefill_tokens == 40 and batch.num_decodes == 0
    sched.complete(batch)
    assert seq.num_output == 1
    # A preempted request is not sent for a transfer again.
    sched._preempt(sched.running.pop())
    assert not sched.schedule().transfers


# --------------------------------------------------------------- real NIXL
def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def prefill_then_decode(prefill, decode, request: dict, tamper=None) -> tuple[dict, dict]:
    """vLLM's toy proxy: P with max_tokens 1 and do_remote_decode, then D with P's kv_transfer_params."""
    p = post(prefill.url + "/v1/completions",
             {**request, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    params = p["kv_transfer_params"]
    if tamper is not None:
        params = tamper(params)
    return params, post(decode.url + "/v1/completions", {**request, "kv_transfer_params": params})


def start_disagg(start_mocker):
    """An aggregated reference, a prefill and a decode mocker with NIXL, started side by side."""
    workers = [
        start_mocker("--speedup-ratio", "0", name="agg", wait_ready=False),
        start_mocker("--role", "prefill", "--speedup-ratio", "0", *NIXL_FLAGS, name="prefill", wait_ready=False),
        start_mocker("--role", "decode", "--speedup-ratio", "0", *NIXL_FLAGS, name="decode", wait_ready=False),
    ]
    for w in workers:
        w.wait_ready(60)  # importing nixl imports torch: a few seconds on a busy machine
    return workers


def nixl_counters(scrape, url: str) -> dict[str, float]:
    m = scrape(url)
    return {k.removeprefix("mocker:").removesuffix("_total"): v for k, v in m.items()
            if k.startswith(("mocker:nixl_", "mocker:computed_prefill", "mocker:kv_transfer_seconds"))}


@pytest.mark.nixl
def test_decode_pulls_the_prompts_kv_bytes_from_prefill(nixl, start_mocker, scrape, get_json):
    agg, prefill, decode = start_disagg(start_mocker)
    prompt = list(range(300, 300 + 200))  # 12 full blocks and 8 tokens
    request = {"model": "mock", "prompt": prompt, "max_tokens": 24, "seed": 1234}
    expected = post(agg.url + "/v1/completions", request)["choices"][0]["text"]

    meta = get_json(prefill.url + "/kv_transfer/nixl_metadata")
    block_bytes = BLOCK * TOKEN_BYTES
    assert meta["block_bytes"] == block_bytes and meta["num_blocks"] == 512 and meta["agent_metadata"]

    before = nixl_counters(scrape, decode.url)
    params, answer = prefill_then_decode(prefill, decode, request)
    after = nixl_counters(scrape, decode.url)
    assert answer["choices"][0]["text"] == expected
    blocks = len(params["remote_block_ids"][0])
    assert blocks == -(-len(prompt) // BLOCK) == 13
    assert after["nixl_read_bytes"] - before["nixl_read_bytes"] == blocks * block_bytes
    assert after["nixl_read_blocks"] - before["nixl_read_blocks"] == blocks
    assert after["nixl_verify_failed_blocks"] == 0 and after["nixl_failed_pulls"] == 0
    assert after["computed_prefill_tokens"] == 0  # the prompt came over NIXL, not recomputed
    assert after["kv_transfer_seconds_count"] == 1
    assert scrape(prefill.url)["mocker:nixl_stored_tokens_total"] == len(prompt)
    print(f"\nNIXL READ of {blocks} blocks ({blocks * block_bytes} B), first pull with handshake: "
          f"{after['kv_transfer_seconds_sum'] * 1e3:.1f} ms")

    # The lease was released over HTTP once the bytes were in.
    deadline = time.monotonic() + 5
    while get_json(prefill.url + "/debug/kv")["leases"]:
        assert time.monotonic() < deadline, "prefill lease was never released"
        time.sleep(0.02)

    # Same prompt again: decode's prefix cache holds all but the last block; only that moves.
    params, answer = prefill_then_decode(prefill, decode, request)
    again = nixl_counters(scrape, decode.url)
    assert answer["choices"][0]["text"] == expected
    tail = blocks - (len(prompt) - 1) // BLOCK
    assert again["nixl_read_bytes"] - after["nixl_read_bytes"] == tail * block_bytes
    assert again["nixl_failed_pulls"] == 0 and again["computed_prefill_tokens"] == 0
    print(f"second pull ({tail} block): {(again['kv_transfer_seconds_sum'] - after['kv_transfer_seconds_sum']) * 1e3:.2f} ms")


@pytest.mark.nixl
def test_decode_rejects_bytes_that_are_not_the_prompts_and_recomputes(nixl, start_mocker, scrape):
    agg, prefill, decode = start_disagg(start_mocker)
    prompt = list(range(40, 40 + 64))  # 4 full blocks
    request = {"model": "mock", "prompt": prompt, "max_tokens": 8, "seed": 5}
    expected = post(agg.url + "/v1/completions", request)["choices"][0]["text"]

    def reverse(params: dict) -> dict:
        return {**params, "remote_block_ids": [params["remote_block_ids"][0][::-1]]}

    _, answer = prefill_then_decode(prefill, decode, request, tamper=reverse)
    c = nixl_counters(scrape, decode.url)
    assert c["nixl_read_blocks"] == 4  # the bytes moved, but into the wrong places
    assert c["nixl_verify_failed_blocks"] == 4 and c["nixl_failed_pulls"] == 1
    assert c["computed_prefill_tokens"] == len(prompt)  # so decode computed the prompt itself
    assert answer["choices"][0]["text"] == expected


@pytest.mark.nixl
@pytest.mark.slow
def test_dynamo_serve_passes_kv_transfer_to_supervised_workers(nixl, tmp_path, serve, scrape):
    profile = tmp_path / "nixl.yaml"
    args = f"{{speedup-ratio: 10, kv-transfer: nixl, kv-bytes-per-token: {TOKEN_BYTES}, num-gpu-blocks: 1024}}"
    profile.write_text(textwrap.dedent(f"""\
        name: nixl
        model: {{name: mock, block_size: {BLOCK}}}
        backend: mocker
        nats: {{port: 0}}
        frontend: {{port: 0}}
        ports: {{base: 0}}
        workers:
          prefill: {{role: prefill, replicas: 1, args: {args}}}
          decode: {{role: decode, replicas: 1, args: {args}}}
        """))
    state = serve(profile).wait_ready(90)

    class Worker:  # what prefill_then_decode needs of a worker
        def __init__(self, name: str) -> None:
            self.url = state["processes"][name]["url"]

    prefill, decode = Worker("prefill-0"), Worker("decode-0")
    request = {"model": "mock", "prompt": list(range(1000, 1100)), "max_tokens": 16, "seed": 7}
    params, answer = prefill_then_decode(prefill, decode, request)
    assert answer["usage"]["completion_tokens"] == 16
    d = scrape(decode.url)
    assert d["mocker:nixl_read_bytes_total"] == len(params["remote_block_ids"][0]) * BLOCK * TOKEN_BYTES == 7 * 1024
    assert d["mocker:nixl_failed_pulls_total"] == 0 and d["mocker:computed_prefill_tokens_total"] == 0
