"""vLLM NixlConnector-style disaggregation between mocker workers.

Protocol (the proxy's view is exactly vLLM's, reference/engine-protocols.md §b):

1. The proxy sends the client request to a ``--role prefill`` mocker with
   ``max_tokens: 1``, ``stream: false`` and ``kv_transfer_params:
   {"do_remote_decode": true, ...}``. The mocker prefills, generates one
   token and answers with a top-level ``kv_transfer_params`` object
   (:func:`prefill_result_params`). It keeps the request's blocks alive under
   a lease (30 s, as vLLM's ``kv_lease_duration``).
2. The proxy sends the original request to a ``--role decode`` mocker with
   those parameters verbatim. The decode mocker allocates blocks for the
   prompt (reusing its own prefix cache), gets the blocks it does not have
   (below), then decodes without recomputing the prompt.
3. When the transfer is over the decode mocker tells the prefill mocker to
   drop the lease: ``POST http://remote_host:remote_port/kv_transfer/release``
   with ``{"remote_engine_id", "remote_request_id"}``. This stands in for
   NIXL's completion notification (vLLM's prefill worker frees its blocks on
   that notification), in both transfer modes.

How the blocks move depends on ``--kv-transfer`` (the same on both workers):

- ``model`` (default): nothing moves; the decode mocker waits the modelled
  time ``tokens * kv_bytes_per_token * 8 / bandwidth``.
- ``nixl`` (the optional ``nixl`` extra, :mod:`.nixl_transfer`): every mocker
  has a host-memory KV pool registered with a NIXL agent (UCX, DRAM) and
  writes each computed token's KV bytes, a function of the tokens up to it,
  into its block. The decode mocker fetches the prefill mocker's agent
  metadata once from ``GET http://remote_host:remote_port/kv_transfer/nixl_metadata``
  (vLLM uses a side channel for this handshake), READs the missing blocks
  (``remote_block_ids``) from the prefill mocker's memory into its own
  blocks, checks every received token, and only then decodes. A pull that
  fails or does not verify is counted (``mocker:nixl_failed_pulls_total``)
  and the prompt is computed on the decode worker instead.
"""

from __future__ import annotations

import logging
from typing import Any

from .protocol import ApiError, bad
from .scheduler import Sequence

__all__ = ["prefill_result_params", "parse_remote_prefill", "wants_remote_decode", "ReleaseNotifier"]

log = logging.getLogger("dynamo.mocker.disagg")

LEASE_SECONDS = 30.0
RELEASE_PATH = "/kv_transfer/release"


def wants_remote_decode(params: dict | None) -> bool:
    return bool(params) and params.get("do_remote_decode") is True  # type: ignore[union-attr]


def prefill_result_params(
    seq: Sequence, *, engine_id: str, host: str, port: int, block_size: int
) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill worker returns for a finished request."""
    prompt_blocks = -(-seq.prompt_len // block_size)
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(seq.blocks[:prompt_blocks])],
        "remote_engine_id": engine_id,
        "remote_request_id": seq.request_id,
        "remote_host": host,
        "remote_port": port,
        "remote_num_tokens": seq.prompt_len,
        "remote_blocks_expiry_time": None,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "transfer_mode": "pull",
    }


def parse_remote_prefill(params: dict | None) -> dict | None:
    """Validate the parameters a decode worker receives; None when not a remote prefill."""
    if not params or params.get("do_remote_prefill") is not True:
        return None
    host = params.get("remote_host")
    port = params.get("remote_port")
    if host is not None and not isinstance(host, str):
        raise bad("'kv_transfer_params.remote_host' must be a string", "kv_transfer_params")
    if port is not None and (type(port) is not int or not 0 < port < 65536):
        raise bad("'kv_transfer_params.remote_port' must be a TCP port number", "kv_transfer_params")
    rid = params.get("remote_request_id")
    if rid is not None and not isinstance(rid, str):
        raise bad("'kv_transfer_params.remote_request_id' must be a string", "kv_transfer_params")
    ids = params.get("prompt_token_ids")
    if ids is not None and (
        not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids)
    ):
        raise bad("'kv_transfer_params.prompt_token_ids' must be a non-empty array of token ids", "kv_transfer_params")
    return params


def parse_release(body: Any, engine_id: str) -> str:
    """Validate a lease-release body; returns the request id to release."""
    if not isinstance(body, dict) or not isinstance(body.get("remote_request_id"), str):
        raise bad("expected {\"remote_request_id\": str, \"remote_engine_id\": str}")
    eid = body.get("remote_engine_id")
    if eid is not None and eid != engine_id:
        raise ApiError(404, f"engine {eid!r} is not this worker (this is {engine_id!r})", param="remote_engine_id")
    return body["remote_request_id"]


class ReleaseNotifier:
    """Tells prefill workers, over HTTP, that their blocks have been pulled."""

    def __init__(self) -> None:
        self._session = None

    async def release(self, params: dict) -> None:
        host, port, rid = params.get("remote_host"), params.get("remote_port"), params.get("remote_request_id")
        if not (host and port and rid):
            return
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        url = f"http://{host}:{port}{RELEASE_PATH}"
        body = {"remote_request_id": rid, "remote_engine_id": params.get("remote_engine_id")}
        try:
            async with self._session.post(url, json=body) as resp:
                if resp.status != 200:
                    log.info("prefill worker %s refused lease release: HTTP %d", url, resp.status)
        except Exception as exc:  # the lease expires on its own; never fail the decode
            log.info("could not release prefill lease at %s: %s", url, exc)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
