"""Prefill -> decode disaggregation through vLLM's kv_transfer_params protocol."""

from __future__ import annotations

import copy
import json
import time
import urllib.request

import openai

PROMPT = [{"role": "user", "content": "hello world, the sea and the island and the mountain " * 8}]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def proxy(prefill, decode, request: dict) -> tuple[dict, str]:
    """What vLLM's toy proxy does: P with max_tokens=1, then D with P's kv_transfer_params."""
    p_req = copy.deepcopy(request)
    p_req.update(
        stream=False,
        max_tokens=1,
        kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                            "remote_block_ids": None, "remote_host": None, "remote_port": None},
    )
    p_req.pop("stream_options", None)
    p_req.pop("min_tokens", None)
    p_resp = post(prefill.url + "/v1/chat/completions", p_req)
    params = p_resp["kv_transfer_params"]
    c = openai.OpenAI(base_url=decode.url + "/v1", api_key="x", max_retries=0)
    stream = c.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True}, extra_body={"kv_transfer_params": params}
    )
    text, usage = [], None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        elif ch.choices and ch.choices[0].delta.content:
            text.append(ch.choices[0].delta.content)
    assert usage.completion_tokens == request["max_tokens"]
    return params, "".join(text)


def test_prefill_then_decode_matches_aggregated(start_mocker, scrape, get_json):
    agg = start_mocker("--speedup-ratio", "0", name="agg")
    prefill = start_mocker("--role", "prefill", "--speedup-ratio", "0", name="prefill")
    decode = start_mocker("--role", "decode", "--speedup-ratio", "10", name="decode")
    request = {"model": "mock", "messages": PROMPT, "max_tokens": 24, "seed": 1234}

    expected = openai.OpenAI(base_url=agg.url + "/v1", api_key="x").chat.completions.create(**request)
    expected_text = expected.choices[0].message.content

    params, text = proxy(prefill, decode, request)
    assert text == expected_text

    # P's answer carries what a NixlConnector decode worker needs.
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    for key in ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port", "remote_request_id"):
        assert params[key] is not None, key
    prompt_len = expected.usage.prompt_tokens
    assert params["remote_num_tokens"] == prompt_len
    assert len(params["remote_block_ids"]) == 1 and len(params["remote_block_ids"][0]) == -(-prompt_len // 16)
    assert params["remote_port"] == prefill.port

    # D never recomputed the prompt: the transfer replaced the prefill compute.
    d = scrape(decode.url)
    assert d["mocker:computed_prefill_tokens_total"] == 0
    assert d["mocker:kv_transfer_seconds_count"] == 1
    # 25 Gbit/s, 128 KiB per token, speedup 10.
    assert abs(d["mocker:kv_transfer_seconds_sum"] - prompt_len * 131072 * 8 / 25e9 / 10) < 1e-6
    assert d["vllm:kv_cache_usage_perc"] == 0

    # D released P's lease after the transfer; P's blocks are free again.
    deadline = time.monotonic() + 5
    while get_json(prefill.url + "/debug/kv")["leases"]:
        assert time.monotonic() < deadline, "prefill lease was never released"
        time.sleep(0.02)
    assert scrape(prefill.url)["vllm:kv_cache_usage_perc"] == 0

    # A second request with the same prompt: D's own prefix cache covers most of it.
    params2, text2 = proxy(prefill, decode, request)
    assert text2 == expected_text
    d2 = scrape(decode.url)
    transferred = (d2["mocker:kv_transfer_seconds_sum"] - d["mocker:kv_transfer_seconds_sum"]) * 25e9 * 10 / 8 / 131072
    assert round(transferred) == prompt_len - (prompt_len - 1) // 16 * 16


def test_prefill_holds_blocks_until_release_or_lease(start_mocker, scrape, get_json):
    prefill = start_mocker("--role", "prefill", "--speedup-ratio", "0")
    body = {"model": "mock", "prompt": list(range(20, 84)), "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}}
    resp = post(prefill.url + "/v1/completions", body)
    params = resp["kv_transfer_params"]
    assert resp["choices"][0]["finish_reason"] == "length" and resp["usage"]["completion_tokens"] == 1
    assert get_json(prefill.url + "/debug/kv")["leases"] == [params["remote_request_id"]]
    assert scrape(prefill.url)["vllm:kv_cache_usage_perc"] > 0
    # Wrong engine id is refused, the right one releases.
    bad = urllib.request.Request(
        prefill.url + "/kv_transfer/release",
        data=json.dumps({"remote_request_id": params["remote_request_id"], "remote_engine_id": "other"}).encode(),
    )
    try:
        urllib.request.urlopen(bad, timeout=5)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    post(prefill.url + "/kv_transfer/release",
         {"remote_request_id": params["remote_request_id"], "remote_engine_id": params["remote_engine_id"]})
    assert scrape(prefill.url)["vllm:kv_cache_usage_perc"] == 0

    # An aggregated worker ignores kv_transfer_params, as vLLM without a connector.
    agg = start_mocker("--speedup-ratio", "0")
    assert post(agg.url + "/v1/completions", body)["kv_transfer_params"] is None
