"""Contract tests: the request shapes each engine's disaggregation protocol documents (engine-protocols.md)."""

import random

import pytest

from dynamo.core.disagg import EarlyFinish, SglangProtocol, TrtllmProtocol, VllmProtocol, strip_foreign

BODY = {"model": "m", "prompt": "hello", "max_tokens": 50, "min_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True}}


def test_vllm_prefill_is_one_token_non_streaming_with_do_remote_decode():
    proto = VllmProtocol()
    pre = proto.prefill_body(BODY, {"url": "http://p:1"}, "r")
    assert pre["max_tokens"] == 1 and pre["stream"] is False
    assert "stream_options" not in pre and "min_tokens" not in pre
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    params = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[1, 2]], "remote_host": "h",
              "remote_port": 5600}
    fields = proto.decode_fields(BODY, {"kv_transfer_params": params}, pre, "/v1/completions")
    decode = strip_foreign(BODY, fields)
    assert decode["kv_transfer_params"] == params  # verbatim
    assert decode["stream"] is True and decode["max_tokens"] == 50  # the client's original request
    assert proto.decode_fields(BODY, {"kv_transfer_params": None}, pre, "/v1/completions") == {}


def test_sglang_sends_the_same_body_with_bootstrap_fields_to_both():
    proto = SglangProtocol(random.Random(1))
    pre = proto.prefill_body(BODY, {"url": "http://10.0.0.5:30000", "bootstrap_port": 8998}, "r")
    assert pre["bootstrap_host"] == "10.0.0.5" and pre["bootstrap_port"] == 8998
    assert 0 <= pre["bootstrap_room"] < 2**63
    assert proto.concurrent
    decode = strip_foreign(BODY, proto.decode_fields(BODY, None, pre, "/v1/completions"))
    assert decode == pre  # identical request to P and D
    v6 = proto.prefill_body(BODY, {"url": "http://[fd00::1]:30000"}, "r")
    assert v6["bootstrap_host"] == "[fd00::1]" and v6["bootstrap_port"] is None
    assert pre["bootstrap_room"] != proto.prefill_body(BODY, {"url": "http://h:1"}, "r")["bootstrap_room"]


def test_trtllm_context_only_then_generation_only_without_foreign_keys():
    proto = TrtllmProtocol(random.Random(2))
    body = {**BODY, "kv_transfer_params": {"x": 1}}
    ctx = proto.prefill_body(body, {"url": "http://c:1"}, "r")
    assert ctx["disaggregated_params"]["request_type"] == "context_only"
    assert ctx["stream"] is False and ctx["stream_options"] is None and ctx["max_tokens"] == 50
    assert "kv_transfer_params" not in ctx
    answer = {"choices": [{"index": 0, "text": "x", "finish_reason": "length",
                           "disaggregated_params": {"request_type": "context_only", "ctx_request_id": 77,
                                                    "encoded_opaque_state": "b64", "first_gen_tokens": [9]}}],
              "prompt_token_ids": [1, 2, 3], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    fields = proto.decode_fields(body, answer, ctx, "/v1/completions")
    gen = strip_foreign(body, fields)
    params = gen["disaggregated_params"]
    assert params["request_type"] == "generation_only" and params["ctx_request_id"] == 77
    assert params["disagg_request_id"] == ctx["disaggregated_params"]["disagg_request_id"]
    assert params["ctx_usage"] == answer["usage"]
    assert gen["prompt"] == [1, 2, 3] and "kv_transfer_params" not in gen
    chat = proto.decode_fields(body, answer, ctx, "/v1/chat/completions")
    assert chat["prompt_token_ids"] == [1, 2, 3] and "prompt" not in chat


def test_trtllm_first_token_eos_finishes_early():
    proto = TrtllmProtocol()
    ctx = proto.prefill_body(BODY, {"url": "http://c:1"}, "r")
    answer = {"choices": [{"finish_reason": "stop", "disaggregated_params": {"ctx_request_id": 1}}]}
    with pytest.raises(EarlyFinish):
        proto.decode_fields(BODY, answer, ctx, "/v1/completions")


def test_an_early_finish_streams_its_text_finish_reason_and_usage():
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    chat = EarlyFinish({"id": "c1", "object": "chat.completion", "created": 3, "model": "m", "usage": usage,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                     "finish_reason": "stop"}]})
    first, last = chat.stream_chunks(include_usage=True)
    assert first == {"id": "c1", "object": "chat.completion.chunk", "created": 3, "model": "m", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}]}
    assert last["choices"] == [] and last["usage"] == usage
    text = EarlyFinish({"id": "t", "object": "text_completion", "model": "m", "usage": usage,
                        "choices": [{"index": 0, "text": "!", "finish_reason": "stop"}]})
    assert text.stream_chunks(include_usage=False) == [
        {"id": "t", "object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "!", "finish_reason": "stop"}]}]
