"""Disaggregated prefill → decode: the request shapes of each engine's protocol.

The frontend picks a prefill and a decode worker; these classes say what each receives
(engine-protocols.md §b–d):

- **vLLM** (``kv_transfer_params``), sequential: prefill gets the request with
  ``max_tokens: 1``, ``stream: false`` and ``do_remote_decode``; its response's
  ``kv_transfer_params`` go verbatim to the decode worker with the original request.
- **SGLang** (bootstrap host/port/room), concurrent: the *same* request, with the prefill
  server's ``bootstrap_host``/``bootstrap_port`` and a random ``bootstrap_room``, goes to
  both; the decode response is the answer.
- **TensorRT-LLM** (``disaggregated_params``), sequential: ``context_only`` with
  ``stream: false`` on the context server, then ``generation_only`` carrying the context
  choice's params, ``ctx_usage`` and the prompt token ids. TRT-LLM forbids unknown fields,
  so no other engine's keys may remain in the body.
"""

from __future__ import annotations

import random
from urllib.parse import urlparse

_FOREIGN = ("kv_transfer_params", "bootstrap_host", "bootstrap_port", "bootstrap_room", "disaggregated_params")


class EarlyFinish(Exception):
    """The prefill step already produced the whole answer (TRT-LLM: first token was EOS or a stop)."""

    def __init__(self, response: dict):
        super().__init__("finished during prefill")
        self.response = response

    def stream_chunks(self, include_usage: bool) -> list[dict]:
        """The answer as the chunks a stream would have carried: its content with the finish reason,
        then (``include_usage``) the usage chunk."""
        answer = self.response
        chat = answer.get("object") == "chat.completion"
        base = {k: answer[k] for k in ("id", "created", "model") if k in answer}
        base["object"] = "chat.completion.chunk" if chat else "text_completion"
        choices = []
        for i, choice in enumerate(answer.get("choices") or []):
            if not isinstance(choice, dict):
                continue
            out: dict = {"index": choice.get("index", i)}
            if chat:
                message = choice.get("message") or {}
                out["delta"] = {"role": message.get("role") or "assistant", "content": message.get("content") or ""}
            else:
                out["text"] = choice.get("text") or ""
            out["finish_reason"] = choice.get("finish_reason")
            choices.append(out)
        chunks = [{**base, "choices": choices}]
        if include_usage and isinstance(answer.get("usage"), dict):
            chunks.append({**base, "choices": [], "usage": answer["usage"]})
        return chunks


class DisaggProtocol:
    name = ""
    concurrent = False

    def prefill_body(self, body: dict, prefill: dict, request_id: str) -> dict:
        raise NotImplementedError

    def decode_fields(self, body: dict, prefill_response: dict | None, prefill_body: dict, path: str) -> dict:
        """Fields merged into the client's request for the decode worker."""
        raise NotImplementedError


class VllmProtocol(DisaggProtocol):
    name = "vllm"

    def prefill_body(self, body: dict, prefill: dict, request_id: str) -> dict:
        out = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens", "min_tokens")}
        out.update({"max_tokens": 1, "stream": False,
                    "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                           "remote_engine_id": None, "remote_block_ids": None,
                                           "remote_host": None, "remote_port": None}})
        return out

    def decode_fields(self, body: dict, prefill_response: dict | None, prefill_body: dict, path: str) -> dict:
        params = (prefill_response or {}).get("kv_transfer_params")
        return {"kv_transfer_params": params} if params else {}


class SglangProtocol(DisaggProtocol):
    name = "sglang"
    concurrent = True

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.SystemRandom()

    def prefill_body(self, body: dict, prefill: dict, request_id: str) -> dict:
        host = urlparse(prefill["url"]).hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return {**body, "bootstrap_host": host, "bootstrap_port": prefill.get("bootstrap_port"),
                "bootstrap_room": self.rng.randrange(2**63)}

    def decode_fields(self, body: dict, prefill_response: dict | None, prefill_body: dict, path: str) -> dict:
        return {k: prefill_body[k] for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")}


class TrtllmProtocol(DisaggProtocol):
    name = "trtllm"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.SystemRandom()

    def prefill_body(self, body: dict, prefill: dict, request_id: str) -> dict:
        out = {k: v for k, v in body.items() if k not in _FOREIGN}
        out.update({"stream": False, "stream_options": None,
                    "disaggregated_params": {"request_type": "context_only",
                                             "disagg_request_id": self.rng.randrange(2**62),
                                             "schedule_style": "context_first"}})
        return out

    def decode_fields(self, body: dict, prefill_response: dict | None, prefill_body: dict, path: str) -> dict:
        if not prefill_response:
            return {}
        choices = prefill_response.get("choices") or []
        if len(choices) != 1 or not choices[0].get("disaggregated_params"):
            return {}
        if choices[0].get("finish_reason") not in ("length", "not_finished", None):
            raise EarlyFinish(prefill_response)
        params = dict(choices[0]["disaggregated_params"])
        params.update({"request_type": "generation_only", "schedule_style": "context_first",
                       "ctx_usage": prefill_response.get("usage"),
                       "disagg_request_id": prefill_body["disaggregated_params"]["disagg_request_id"]})
        fields: dict = {"disaggregated_params": params}
        ids = prefill_response.get("prompt_token_ids")
        if ids:
            if path.endswith("chat/completions"):
                fields["prompt_token_ids"] = ids
            else:
                fields["prompt"] = ids
        return fields


PROTOCOLS: dict[str, type[DisaggProtocol]] = {"vllm": VllmProtocol, "sglang": SglangProtocol, "trtllm": TrtllmProtocol}
BACKEND_PROTOCOL = {"mocker": "vllm", "vllm": "vllm", "sglang": "sglang", "trtllm": "trtllm"}


def strip_foreign(body: dict, keep: dict) -> dict:
    """The body without other protocols' fields (TRT-LLM rejects unknown keys), plus ``keep``."""
    return {**{k: v for k, v in body.items() if k not in _FOREIGN}, **keep}
