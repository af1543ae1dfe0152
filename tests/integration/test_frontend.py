"""The frontend and router with mocker workers: the official openai client, KV routing, faults, disaggregation."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import textwrap
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

MODEL = "Qwen/Qwen3-0.6B"
FREE_PORTS = ("--set", "frontend.port=0", "--set", "nats.port=0", "--set", "ports.base=0")


def mocker_profile(tmp_path, *, workers: str, router: str = "round_robin", extra: str = "", name: str = "t") -> str:
    text = textwrap.dedent(f"""\
        name: {name}
        model: {{name: {MODEL}, block_size: 16}}
        backend: mocker
        nats: {{port: 0}}
        frontend: {{port: 0}}
        ports: {{base: 0}}
        router: {{mode: {router}}}
        restart: {{policy: on-failure, max_restarts: 3, backoff: {{initial: 0.2s, max: 1s}}}}
        workers:
        """) + textwrap.indent(textwrap.dedent(workers), "  ") + extra
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def client(state: dict, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=state["endpoint"] + "/v1", api_key="none", max_retries=0, **kwargs)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_openai_client_through_the_default_profile(serve):
    """The issue's end-to-end path: `dynamo serve profiles/agg.yaml --backend mocker`, official client."""
    run = serve("profiles/agg.yaml", "--backend", "mocker", *FREE_PORTS)
    state = run.wait_ready(60)
    api = client(state)
    messages = [{"role": "user", "content": "Say hello"}]

    reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8

    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 8

    completion = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert completion.choices[0].text and completion.usage.completion_tokens == 4
    assert [m.id for m in api.models.list().data] == [MODEL]

    async def async_calls() -> tuple[str, str]:
        aapi = openai.AsyncOpenAI(base_url=state["endpoint"] + "/v1", api_key="none", max_retries=0)
        unary = await aapi.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        stream = await aapi.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await aapi.close()
        return unary.choices[0].message.content, "".join(pieces)

    unary_text, stream_text = asyncio.run(async_calls())
    assert unary_text and unary_text == stream_text  # deterministic mocker: same prompt, same text

    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="other-model", messages=messages, max_tokens=1)
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "%s"}' % MODEL.encode(), 400, "messages"),
        (b'{"model": "%s", "messages": "hi"}' % MODEL.encode(), 400, "messages"),
        (b'{"model": "%s", "messages": [{"content": "x"}]}' % MODEL.encode(), 400, "messages"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}' % MODEL.encode(), 400, "stream"),
        (b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}' % MODEL.encode(), 400, "max_tokens"),
        (b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}' % MODEL.encode(), 400, "max_tokens"),
        (b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "n": 3}' % MODEL.encode(), 400, None),
    ],
)
def test_malformed_bodies_get_openai_errors_never_500(shared_run, body, status, param):
    reply = httpx.post(shared_run["endpoint"] + "/v1/chat/completions", content=body,
                       headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and "code" in error
    if param:
        assert error["type"] == "invalid_request_error"  # the frontend's own check, before any worker
        assert error["param"] == param


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": [-5] * 32},  # token ids the router packs as u32
    {"model": MODEL, "prompt": [2**32] * 32},
    {"model": MODEL, "prompt": [[1, 2], "mixed"]},
])
def test_bad_prompts_get_400_never_500(shared_run, body):
    reply = httpx.post(shared_run["endpoint"] + "/v1/completions", json=body, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text


def test_deeply_nested_json_gets_400(shared_run):
    deep = b'{"prompt": "x", "a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    reply = httpx.post(shared_run["endpoint"] + "/v1/completions", content=deep,
                       headers={"content-type": "application/json"}, timeout=10)
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_every_prompt_form_openai_accepts_reaches_the_worker(shared_run):
    api = client(shared_run)
    for prompt in (["Once upon a time"], [[11, 12, 13]], [11, 12, 13]):
        reply = api.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        assert reply.usage.completion_tokens == 2
    batch = httpx.post(shared_run["endpoint"] + "/v1/completions", timeout=10,
                       json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2})
    assert batch.status_code == 400 and "batched" in batch.json()["error"]["message"]  # the mocker's own answer
    # vLLM's leniency: no model (the served one), stream null, an integral float
    reply = httpx.post(shared_run["endpoint"] + "/v1/completions", timeout=10,
                       json={"prompt": "hi", "stream": None, "max_tokens": 3.0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_a_content_length_over_the_limit_gets_413_without_the_body_being_sent(shared_run):
    # a client that announces 1 GB and then waits (for 100-continue, or out of caution) is answered now
    host, port = shared_run["endpoint"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{\"prompt\": ")
        head = b""
        while b"MiB" not in head and (chunk := sock.recv(65536)):  # the answer, without waiting for a close
            head += chunk
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"larger than 32 MiB" in head and b"Connection: close" in head, head


def test_a_body_over_the_limit_gets_413_and_the_frontend_keeps_serving(shared_run):
    huge = b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), b"x" * (33 * 2**20))  # default limit: 32 MiB
    reply = httpx.post(shared_run["endpoint"] + "/v1/completions", content=huge,
                       headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 413
    assert "larger than 32 MiB" in reply.json()["error"]["message"]
    # 2 MiB is within the limit (aiohttp's own default is 1 MiB): it reaches the worker, whose context it exceeds
    big = httpx.post(shared_run["endpoint"] + "/v1/completions", timeout=30,
                     json={"model": MODEL, "prompt": "x" * 2 * 2**20, "max_tokens": 1})
    assert big.status_code == 400 and "maximum context length" in big.json()["error"]["message"]
    ok = httpx.post(shared_run["endpoint"] + "/v1/completions", timeout=10,
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_request_id_and_health(shared_run):
    reply = httpx.post(shared_run["endpoint"] + "/v1/completions", headers={"x-request-id": "abc-123"},
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=10)
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "abc-123"
    health = httpx.get(shared_run["endpoint"] + "/health", timeout=5).json()
    assert health["status"] == "healthy" and len(health["workers"]) == 2
    assert httpx.get(shared_run["endpoint"] + "/live", timeout=5).json() == {"status": "live"}
    assert metric(shared_run["endpoint"], "dynamo_frontend_requests_total") >= 1


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 404), ("GET", "/v2/models", 404), ("DELETE", "/health", 405), ("GET", "/v1/completions", 405)])
def test_unknown_paths_and_methods_get_openai_errors(shared_run, method, path, status):
    reply = httpx.request(method, shared_run["endpoint"] + path, headers={"x-request-id": "r-1"}, timeout=10)
    assert reply.status_code == status and reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"]["message"] and reply.headers["x-request-id"] == "r-1"


def test_every_answer_carries_a_request_id(shared_run):
    for path in ("/v1/models", "/health", "/live"):
        assert len(httpx.get(shared_run["endpoint"] + path, timeout=10).headers["x-request-id"]) == 32
        reply = httpx.get(shared_run["endpoint"] + path, headers={"x-request-id": "mine"}, timeout=10)
        assert reply.headers["x-request-id"] == "mine"


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One aggregated mocker run for the cheap request-level tests."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("shared")
    profile = mocker_profile(tmp, workers="""\
        w: {replicas: 2, args: {speedup-ratio: 0}}
        """)
    run_dir = tmp / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dynamo.cli.app", "serve", profile, "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "DYNAMO_HOME": str(tmp / "home")})
    try:
        deadline = time.monotonic() + 60
        state: dict = {}
        while time.monotonic() < deadline:
            try:
                import json

                state = json.loads((run_dir / "state.json").read_text())
            except (OSError, ValueError):
                pass
            if state.get("status") == "ready":
                break
            time.sleep(0.1)
        assert state.get("status") == "ready"
        yield state
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def router_stats(plan: dict) -> dict:
    import json

    import nats

    async def ask() -> dict:
        nc = await nats.connect(plan["nats_url"])
        try:
            return json.loads((await nc.request(f"{plan['namespace']}.router.stats", b"", timeout=5)).data)
        finally:
            await nc.close()

    return asyncio.run(ask())


@pytest.mark.parametrize("placement", ["process", "frontend"])
def test_kv_routing_sends_shared_prefixes_to_the_worker_holding_them(tmp_path, serve, placement):
    import json

    profile = mocker_profile(tmp_path, router=f"kv, placement: {placement}", workers="""\
        w: {replicas: 3, args: {speedup-ratio: 10}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    plan = json.loads((run.dir / "plan.json").read_text())
    assert [p["kind"] for p in plan["processes"]].count("router") == (1 if placement == "process" else 0)
    api = client(state)
    workers = {name: p["url"] for name, p in state["processes"].items() if p["kind"] == "worker"}
    for i in range(3):
        prefix = f"document {i}: " + " ".join(f"word{i}x{j}" for j in range(300))
        served = {name: metric(url, "vllm:request_success_total") for name, url in workers.items()}
        hits = {name: metric(url, "vllm:prefix_cache_hits_total") for name, url in workers.items()}
        for round_ in range(4):  # round-robin would spread these over the three workers
            api.completions.create(model=MODEL, prompt=prefix + f" question {round_}", max_tokens=2)
        served = {name: metric(url, "vllm:request_success_total") - served[name] for name, url in workers.items()}
        hits = {name: metric(url, "vllm:prefix_cache_hits_total") - hits[name] for name, url in workers.items()}
        holder = max(served, key=served.get)
        assert sorted(served.values()) == [0, 0, 4], served
        assert hits[holder] >= 3 * 18 * 16, hits  # the later three reuse the prefix's ~19 blocks
    assert metric(state["endpoint"], "dynamo_frontend_router_fallbacks_total") == 0
    stats = router_stats(plan)
    assert stats["decisions"] == 12 and stats["events_applied"] > 0, stats
    assert stats.get("placement", "process") == placement


@pytest.mark.parametrize("api_kind", ["completions", "chat"])
def test_kill_9_a_worker_mid_stream_migrates_every_request(tmp_path, serve, api_kind):
    profile = mocker_profile(tmp_path, workers="""\
        w: {replicas: 3, args: {speedup-ratio: 1}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    api = client(state, timeout=60)
    results: dict[int, tuple[str, int, str | None, int]] = {}
    errors: list[BaseException] = []

    def ask(i: int, **options):
        if api_kind == "chat":
            return api.chat.completions.create(messages=[{"role": "user", "content": f"story {i} about the sea"}],
                                               model=MODEL, **options)
        return api.completions.create(prompt=f"story {i} about the sea", model=MODEL, **options)

    def one(i: int) -> None:
        try:
            stream = ask(i, max_tokens=300, stream=True, stream_options={"include_usage": True})
            text, usage, finish, roles, prompt = "", 0, None, 0, 0
            for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    if api_kind == "chat":
                        text += choice.delta.content or ""
                        roles += choice.delta.role is not None
                    else:
                        text += choice.text or ""
                    finish = choice.finish_reason or finish
                if chunk.usage:
                    usage, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            assert roles == (1 if api_kind == "chat" else 0), f"{roles} role chunks"
            results[i] = (text, usage, finish, prompt)
        except BaseException as exc:  # noqa: BLE001 - the test reports any client failure
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    time.sleep(0.6)  # streams are ~300 × 6 ms long: well underway
    victim = state["processes"]["w-1"]["pid"]
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 9
    assert all(finish == "length" and text for text, _, finish, _ in results.values()), results
    assert all(usage == 300 for _, usage, _, _ in results.values()), [r[1] for r in results.values()]
    # the client's prompt, not the continuation's (which holds the text generated before the move)
    assert {i: r[3] for i, r in results.items()} == {i: ask(i, max_tokens=1).usage.prompt_tokens for i in results}
    assert metric(state["endpoint"], "dynamo_frontend_migrations_total") >= 1


def test_a_stream_whose_worker_dies_in_its_prefill_starts_afresh_on_another(tmp_path, serve):
    # the stream's headers reach the client as soon as a worker accepts the request; a worker that
    # dies before its first token is still a retry, not a migration, and the client sees one answer
    profile = mocker_profile(tmp_path, workers="w: {replicas: 2, args: {speedup-ratio: 0.02}}\n")
    run = serve(profile)
    state = run.wait_ready(60)
    opened = threading.Event()
    result: dict = {}

    def ask() -> None:
        api = client(state, timeout=60)
        with api.chat.completions.with_streaming_response.create(
                model=MODEL, max_tokens=3, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "a long document " * 100}]) as reply:
            opened.set()  # the headers are in; no token yet (the prefill takes ~1 s)
            chunks = list(reply.parse())
        result["roles"] = sum(1 for c in chunks if c.choices and c.choices[0].delta.role)
        result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        result["usage"] = next(c.usage.completion_tokens for c in chunks if c.usage)

    asking = threading.Thread(target=ask)
    asking.start()
    assert opened.wait(10), "the stream's headers never came"
    running = {name: proc for name, proc in state["processes"].items() if proc["kind"] == "worker"
               and metric(proc["url"], "vllm:num_requests_running") >= 1}
    assert len(running) == 1, running
    os.kill(next(iter(running.values()))["pid"], signal.SIGKILL)
    asking.join(30)
    assert result == {"roles": 1, "text": result["text"], "finish": ["length"], "usage": 3} and result["text"], result
    assert metric(state["endpoint"], "dynamo_frontend_retries_total") == 1
    assert metric(state["endpoint"], "dynamo_frontend_migrations_total") == 0


def test_requests_keep_succeeding_when_the_router_dies(tmp_path, serve):
    profile = mocker_profile(tmp_path, router="kv", workers="""\
        w: {replicas: 2, args: {speedup-ratio: 0}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    api = client(state)
    router_pid = state["processes"]["router"]["pid"]
    os.kill(router_pid, signal.SIGKILL)
    for i in range(20):
        reply = api.completions.create(model=MODEL, prompt=f"ping {i}", max_tokens=2)
        assert reply.choices[0].text
    assert metric(state["endpoint"], "dynamo_frontend_router_fallbacks_total") >= 1
    run.wait_for(lambda: run.state()["processes"]["router"]["status"] == "ready"
                 and run.state()["processes"]["router"]["pid"] != router_pid, what="router restarted")


FAST_HEALTH = "readiness_probe: {period: 0.2s, timeout: 0.5s, failure_threshold: 2}"


def health(state: dict) -> httpx.Response:
    return httpx.get(state["endpoint"] + "/health", timeout=5)


def test_health_is_503_while_no_worker_can_serve_and_recovers(tmp_path, serve):
    profile = mocker_profile(tmp_path, workers=f"""\
        w: {{replicas: 1, args: {{speedup-ratio: 0}}, {FAST_HEALTH}}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    frozen = state["processes"]["w-0"]["pid"]
    os.kill(frozen, signal.SIGSTOP)  # alive but failing its health probe
    deadline = time.monotonic() + 15
    while (reply := health(state)).status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reply.status_code == 503
    assert reply.json()["status"] == "unhealthy" and reply.json()["workers"] == []
    # the supervisor replaces the frozen worker; the frontend serves again once it is ready
    run.wait_for(lambda: health(state).status_code == 200, 60, "a healthy worker again")
    assert run.state()["processes"]["w-0"]["pid"] != frozen
    assert client(state).completions.create(model=MODEL, prompt="back", max_tokens=2).choices[0].text


def test_a_request_arriving_while_the_only_worker_restarts_waits_for_it(tmp_path, serve):
    profile = Path(mocker_profile(tmp_path, workers="w: {replicas: 1, args: {speedup-ratio: 0}, readiness_probe: "
                                                     "{period: 0.2s, timeout: 0.5s, failure_threshold: 40}}\n"))
    profile.write_text(profile.read_text().replace("initial: 0.2s", "initial: 0.5s"))  # a restart takes ~1 s
    run = serve(profile)
    state = run.wait_ready(60)
    os.kill(state["processes"]["w-0"]["pid"], signal.SIGKILL)
    run.wait_for(lambda: health(state).status_code == 503, 10, "the worker gone from rotation")
    started = time.monotonic()
    reply = client(state, timeout=30).completions.create(model=MODEL, prompt="still there?", max_tokens=2)
    assert reply.usage.completion_tokens == 2 and time.monotonic() - started < 3
    os.kill(run.state()["processes"]["w-0"]["pid"], signal.SIGSTOP)  # frozen: leaves rotation, not replaced in 3 s
    try:
        run.wait_for(lambda: health(state).status_code == 503, 15, "the frozen worker out of rotation")
        started = time.monotonic()
        gone = httpx.post(state["endpoint"] + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30)
        assert gone.status_code == 503 and gone.headers["Retry-After"] == "1"
        assert "no worker is ready" in gone.json()["error"]["message"] and time.monotonic() - started >= 2.9
    finally:
        os.kill(run.state()["processes"]["w-0"]["pid"], signal.SIGCONT)


def test_a_worker_failing_health_leaves_rotation_and_returns(tmp_path, serve):
    profile = mocker_profile(tmp_path, workers=f"""\
        w: {{replicas: 2, args: {{speedup-ratio: 0}}, {FAST_HEALTH}}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    api = client(state, timeout=30)
    frozen = state["processes"]["w-0"]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    # streams sent to the frozen worker move once it leaves rotation; unary requests too, once it is
    # replaced; none is lost
    for i in range(4):
        chunks = list(api.completions.create(model=MODEL, prompt=f"during {i}", max_tokens=2, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        assert api.completions.create(model=MODEL, prompt=f"during {i}", max_tokens=2).choices[0].text
    run.wait_for(lambda: [w["name"] for w in health(state).json()["workers"]] == ["w-1"], 15, "w-0 out of rotation")
    run.wait_for(lambda: len(health(state).json()["workers"]) == 2, 60, "w-0 back in rotation")
    back = run.state()["processes"]["w-0"]
    assert back["pid"] != frozen
    for i in range(8):
        assert api.completions.create(model=MODEL, prompt=f"after {i}", max_tokens=2).choices[0].text
    assert metric(back["url"], "vllm:request_success_total") >= 1  # the replacement takes its share


def test_disaggregated_output_equals_aggregated_output(tmp_path, serve):
    profile = mocker_profile(tmp_path, workers="""\
        prefill: {role: prefill, replicas: 1, args: {speedup-ratio: 10}}
        decode: {role: decode, replicas: 1, args: {speedup-ratio: 10}}
        """)
    state = serve(profile).wait_ready(60)
    prompt = "The history of tea " * 40
    disagg = client(state).completions.create(model=MODEL, prompt=prompt, max_tokens=24, seed=7)
    decode_url = state["processes"]["decode-0"]["url"]
    prefill_url = state["processes"]["prefill-0"]["url"]
    direct = httpx.post(decode_url + "/v1/completions", timeout=30,
                        json={"model": MODEL, "prompt": prompt, "max_tokens": 24, "seed": 7}).json()
    assert disagg.choices[0].text == direct["choices"][0]["text"]
    assert disagg.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert metric(state["endpoint"], 'dynamo_frontend_disaggregated_requests_total{path="remote"}') == 1
    assert metric(prefill_url, "vllm:prompt_tokens_total") >= disagg.usage.prompt_tokens


def test_a_disaggregated_request_too_long_for_the_context_is_refused_before_its_prefill(tmp_path, serve):
    profile = Path(mocker_profile(tmp_path, workers="""\
        prefill: {role: prefill, replicas: 1, args: {speedup-ratio: 10}}
        decode: {role: decode, replicas: 1, args: {speedup-ratio: 10}}
        """))
    profile.write_text(profile.read_text().replace("block_size: 16}", "block_size: 16, max_model_len: 512}"))
    state = serve(profile).wait_ready(60)
    prefill_url = state["processes"]["prefill-0"]["url"]
    too_long = httpx.post(state["endpoint"] + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "tea " * 40, "max_tokens": 9000})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    assert "maximum context length is 512 tokens" in too_long.json()["error"]["message"]
    assert metric(prefill_url, "vllm:prompt_tokens_total") == 0  # no prefill was computed (nor held) for it
    fits = client(state).completions.create(model=MODEL, prompt="tea " * 40, max_tokens=8)
    assert fits.usage.completion_tokens == 8 and metric(prefill_url, "vllm:prompt_tokens_total") > 0


def test_client_disconnect_cancels_the_upstream_request(tmp_path, serve):
    profile = mocker_profile(tmp_path, workers="""\
        w: {replicas: 1, args: {speedup-ratio: 1}}
        """)
    state = serve(profile).wait_ready(60)
    worker = state["processes"]["w-0"]["url"]
    with httpx.stream("POST", state["endpoint"] + "/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "long", "max_tokens": 2000, "stream": True}) as reply:
        for _ in reply.iter_lines():
            if metric(worker, "vllm:num_requests_running") >= 1:
                break
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and metric(worker, "vllm:num_requests_running") > 0:
        time.sleep(0.02)
    assert metric(worker, "vllm:num_requests_running") == 0
    assert metric(worker, "vllm:generation_tokens_total") < 2000


def test_streams_of_a_frozen_worker_move_once_it_leaves_rotation(tmp_path, serve):
    # the frozen worker is killed only after 20 failed probes (~40 s): its streams must not wait for that
    profile = mocker_profile(tmp_path, workers="""\
        w: {replicas: 2, args: {speedup-ratio: 1}, readiness_probe: {period: 0.2s, timeout: 0.5s, failure_threshold: 20}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    api = client(state, timeout=60)
    finished: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            chunks = list(api.completions.create(model=MODEL, prompt=f"long story {i}", max_tokens=400, stream=True,
                                                 stream_options={"include_usage": True}))
            finished.append((chunks[-1].usage.completion_tokens, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - the test reports any client failure
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    frozen = state["processes"]["w-0"]["pid"]
    os.kill(frozen, signal.SIGSTOP)
    froze_at = time.monotonic()
    try:
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert [tokens for tokens, _ in finished] == [400] * 6
        slowest = max(at for _, at in finished) - froze_at
        assert slowest < 15, f"a stream waited {slowest:.1f}s on the frozen worker"
        assert run.state()["processes"]["w-0"]["pid"] == frozen  # moved, not freed by the supervisor's kill
        assert metric(state["endpoint"], "dynamo_frontend_migrations_total") >= 1
    finally:
        os.kill(frozen, signal.SIGCONT)


def test_a_frozen_router_is_noticed_and_restarted(tmp_path, serve):
    profile = mocker_profile(tmp_path, router="kv", workers="""\
        w: {replicas: 1, args: {speedup-ratio: 0}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    run.freeze_until_replaced("router", 45)  # alive, quiet: no port to probe, but it no longer answers on NATS
    assert client(state).completions.create(model=MODEL, prompt="routed again", max_tokens=2).choices[0].text


def test_the_nats_token_never_appears_on_a_command_line(tmp_path, serve):
    import json
    import stat

    import psutil

    token = "tok-4f9e-never-in-ps"
    profile = Path(mocker_profile(tmp_path, router="kv", workers="w: {replicas: 1, args: {speedup-ratio: 10}}\n"))
    profile.write_text(profile.read_text().replace("nats: {port: 0}", f"nats: {{port: 0, token: {token}}}"))
    run = serve(profile)
    state = run.wait_ready(60)
    reply = client(state).completions.create(model=MODEL, prompt="hello there", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    plan = json.loads((run.dir / "plan.json").read_text())
    assert router_stats(plan)["decisions"] == 1  # the router reached NATS with the token
    for name, proc in state["processes"].items():
        assert token not in " ".join(psutil.Process(proc["pid"]).cmdline()), name
    config = run.dir / "nats.conf"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and token in config.read_text()


def test_two_requests_under_one_request_id_keep_their_own_router_accounting(tmp_path, serve):
    import json

    profile = mocker_profile(tmp_path, router="kv, placement: frontend", workers="""\
        w: {replicas: 1, args: {speedup-ratio: 1}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    plan = json.loads((run.dir / "plan.json").read_text())
    headers = {"x-request-id": "same-id"}
    body = {"model": MODEL, "prompt": "a long answer " * 40, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", state["endpoint"] + "/v1/completions", json=body, headers=headers, timeout=30) as first:
        lines = first.iter_lines()
        assert next(lines).startswith("data:")
        second = httpx.post(state["endpoint"] + "/v1/completions", headers=headers, timeout=30,
                            json={"model": MODEL, "prompt": "short", "max_tokens": 2})
        assert second.status_code == 200 and second.headers["x-request-id"] == "same-id"
        assert sum(router_stats(plan)["active_blocks"].values()) > 0  # the first still counts where it runs
    deadline = time.monotonic() + 5
    while sum(router_stats(plan)["active_blocks"].values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(router_stats(plan)["active_blocks"].values()) == 0  # released when the client left


def test_prefill_workers_killed_mid_dispatch_every_request_still_succeeds(tmp_path, serve):
    profile = mocker_profile(tmp_path, router="kv", workers="""\
        prefill: {role: prefill, replicas: 2, args: {speedup-ratio: 1}}
        decode: {role: decode, replicas: 1, args: {speedup-ratio: 1}}
        """)
    run = serve(profile)
    state = run.wait_ready(60)
    replies: list[httpx.Response] = []

    def one(i: int) -> None:
        replies.append(httpx.post(state["endpoint"] + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": f"request {i}: " + "a long shared document " * 120, "max_tokens": 4}))

    for round_ in range(3):  # the prefill workers are killed at a different moment of the dispatch each time
        threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        time.sleep(0.05 * (round_ + 1))
        for name in ("prefill-0", "prefill-1"):
            try:
                os.kill(run.state()["processes"][name]["pid"], signal.SIGKILL)
            except (ProcessLookupError, KeyError):
                pass
        for t in threads:
            t.join(60)
    assert len(replies) == 30
    assert [(r.status_code, r.headers.get("content-type")) for r in replies if r.status_code != 200] == []
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in replies)


def test_stopping_lets_short_streams_finish_and_ends_long_ones_with_an_error_event(tmp_path, serve):
    import json

    profile = Path(mocker_profile(tmp_path, workers="w: {replicas: 1, args: {speedup-ratio: 1}}\n"))
    profile.write_text(profile.read_text().replace("frontend: {port: 0}", "frontend: {port: 0, grace_period: 3s}"))
    run = serve(profile)
    state = run.wait_ready(60)
    events: dict[str, list[str]] = {"short": [], "long": []}

    def stream(name: str, tokens: int) -> None:
        with httpx.stream("POST", state["endpoint"] + "/v1/completions", timeout=30, json={
                "model": MODEL, "prompt": f"a {name} story", "max_tokens": tokens, "stream": True}) as reply:
            events[name] += [line for line in reply.iter_lines() if line.startswith("data:")]

    threads = [threading.Thread(target=stream, args=("short", 60)), threading.Thread(target=stream, args=("long", 3000))]
    for t in threads:
        t.start()
    run.wait_for(lambda: metric(state["processes"]["w-0"]["url"], "vllm:num_requests_running") >= 2, 10,
                 "both streaming")
    stopped = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    for t in threads:
        t.join(30)
    assert run.wait_exit(30) == 0 and time.monotonic() - stopped < 6  # drain (2 s) + the rest, not a SIGKILL
    short, long = events["short"], events["long"]
    assert short[-1] == "data: [DONE]" and sum('"text"' in e for e in short) == 60  # finished within the drain
    assert long[-1] == "data: [DONE]" and 0 < sum('"text"' in e for e in long) < 3000
    error = json.loads(long[-2].removeprefix("data: "))["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert "SIGKILL" not in run.text()


def test_stopping_lets_a_stream_still_in_its_long_prefill_finish(tmp_path, serve):
    # silent for ~3.5 s (its prefill): when workers left discovery first, it was taken for stuck and cut
    profile = Path(mocker_profile(tmp_path, workers="w: {replicas: 1, args: {speedup-ratio: 0.02}}\n"))
    profile.write_text(profile.read_text().replace("frontend: {port: 0}", "frontend: {port: 0, grace_period: 8s}"))
    run = serve(profile)
    state = run.wait_ready(60)
    lines: list[str] = []

    def ask() -> None:
        with httpx.stream("POST", state["endpoint"] + "/v1/completions", timeout=30, json={
                "model": MODEL, "prompt": "a long document " * 300, "max_tokens": 2, "stream": True}) as reply:
            lines.extend(line for line in reply.iter_lines() if line.startswith("data:"))

    asking = threading.Thread(target=ask)
    asking.start()
    run.wait_for(lambda: metric(state["processes"]["w-0"]["url"], "vllm:num_requests_running") >= 1, 10,
                 "the prefill running")
    run.proc.send_signal(signal.SIGTERM)  # as dynamo stop does
    asking.join(30)
    assert lines[-1] == "data: [DONE]" and sum('"text"' in line for line in lines) == 2, lines
    assert run.wait_exit(30) == 0
