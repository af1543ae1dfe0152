"""Real KV bytes between prefill and decode mockers with NIXL (``--kv-transfer nixl``).

With the default ``--kv-transfer model`` a decode mocker only waits the modelled
transfer time. With ``nixl`` (the optional ``nixl`` extra) every mocker keeps a
host-memory KV pool of ``--num-gpu-blocks x --block-size x --kv-bytes-per-token``
bytes, registered with a NIXL agent (UCX backend, DRAM), and:

- every engine step writes the KV bytes of the tokens it computes into their
  blocks (:meth:`NixlKvTransfer.store`). The bytes of a token are a function of
  the tokens up to it (:func:`token_kv_bytes`), as real KV is, so any worker
  can check a block it received;
- a prefill mocker serves its agent metadata and pool layout at
  ``GET /kv_transfer/nixl_metadata`` (the stand-in for vLLM's NIXL side
  channel); its ``kv_transfer_params`` are unchanged (``remote_host``,
  ``remote_port``, ``remote_engine_id``, ``remote_block_ids``);
- a decode mocker pulls the blocks it does not have with one NIXL READ from the
  prefill mocker's memory into its own blocks (:meth:`NixlKvTransfer.pull`),
  as vLLM's NixlConnector does, checks every received token, and only then
  decodes. The prefill lease is then released over HTTP as in ``model`` mode.
  A pull that fails or does not verify is counted and the prompt is computed
  locally instead, so the answer stays the same.

``nixl`` is imported only by :func:`open_nixl_transfer`; importing this module
costs nothing more than xxhash.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import logging
import mmap
import os
import struct
import time
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from .config import MockerConfig

if TYPE_CHECKING:
    from .scheduler import Batch, Scheduler, Sequence

__all__ = [
    "METADATA_PATH",
    "HostKvPool",
    "KvTransferError",
    "NixlKvTransfer",
    "NixlSetupError",
    "open_nixl_transfer",
    "token_kv_bytes",
]

log = logging.getLogger("dynamo.mocker.nixl")

METADATA_PATH = "/kv_transfer/nixl_metadata"
INSTALL_HINT = (
    "install CPU torch first (pip install torch==2.13.0, or from https://download.pytorch.org/whl/cpu), "
    "then pip install 'dynamo-launcher[nixl]'; or run: bash scripts/nixl_setup.sh VENV_DIR"
)
# A pull is polled this often; one engine step is 1-50 ms, so this adds little.
POLL_SECONDS = 0.0005
READ_TIMEOUT = 30.0

_U32 = struct.Struct("<I")


class NixlSetupError(Exception):
    """``--kv-transfer nixl`` cannot work here (nixl missing, pool too large, no UCX)."""


class KvTransferError(Exception):
    """One pull of KV blocks failed; the request recomputes its prompt."""


def token_kv_bytes(parent_hash: int, block_tokens: Seq[int], size: int) -> bytes:
    """The ``size`` KV bytes of the last token of ``block_tokens``.

    ``block_tokens`` are the tokens of one block up to and including that token
    and ``parent_hash`` the chained hash of the block before (0 for the first):
    the bytes depend on every token before, like a causal model's KV.
    """
    h = xxhash.xxh3_64(seed=parent_hash)
    for t in block_tokens:
        h.update(_U32.pack(t))
    return _fill(h.intdigest(), size)


def _fill(value: int, size: int) -> bytes:
    word = value.to_bytes(8, "little")
    return (word * (size // 8 + 1))[:size]


class HostKvPool:
    """The KV pool in host memory: block ``i`` holds ``block_size`` token slots of ``token_bytes``."""

    def __init__(self, num_blocks: int, block_size: int, token_bytes: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.token_bytes = token_bytes
        self.block_bytes = block_size * token_bytes
        self.size = num_blocks * self.block_bytes
        # Anonymous mmap: page-aligned, and pages cost memory only once written.
        self._buf = mmap.mmap(-1, self.size)
        self._anchor = ctypes.c_char.from_buffer(self._buf)
        self.address = ctypes.addressof(self._anchor)

    def block_address(self, block: int) -> int:
        return self.address + block * self.block_bytes

    def _slots(self, hashes: Seq[int], token_ids: Seq[int], start: int, end: int):
        """(block index, offset in block, expected bytes) for tokens ``start..end-1``."""
        bs = self.block_size
        size = self.token_bytes
        pos = start
        while pos < end:
            b = pos // bs
            block_start = b * bs
            h = xxhash.xxh3_64(seed=hashes[b - 1] if b else 0)
            for t in token_ids[block_start:pos]:
                h.update(_U32.pack(t))
            stop = min(end, block_start + bs)
            for p in range(pos, stop):
                h.update(_U32.pack(token_ids[p]))
                yield b, p - block_start, _fill(h.intdigest(), size)
            pos = stop

    def write(self, blocks: Seq[int], token_ids: Seq[int], hashes: Seq[int], start: int, end: int) -> None:
        """Store the KV bytes of tokens ``start..end-1`` into the sequence's ``blocks``.

        ``hashes`` are the chained hashes of the sequence's full blocks (at least
        those before the block of ``end - 1``).
        """
        buf, bb, tb = self._buf, self.block_bytes, self.token_bytes
        for b, slot, data in self._slots(hashes, token_ids, start, end):
            off = blocks[b] * bb + slot * tb
            buf[off : off + tb] = data

    def bad_blocks(self, blocks: Seq[int], token_ids: Seq[int], hashes: Seq[int], start: int, end: int) -> int:
        """How many of the blocks holding tokens ``start..end-1`` do not hold their KV bytes."""
        buf, bb, tb = self._buf, self.block_bytes, self.token_bytes
        bad: set[int] = set()
        for b, slot, data in self._slots(hashes, token_ids, start, end):
            if b not in bad:
                off = blocks[b] * bb + slot * tb
                if buf[off : off + tb] != data:
                    bad.add(b)
        return len(bad)

    def close(self) -> None:
        del self._anchor
        self._buf.close()


@dataclass
class _Peer:
    """A prefill worker whose pool this worker can read."""

    agent_name: Any
    dlist: Any
    num_blocks: int


class NixlKvTransfer:
    """The NIXL agent of one mocker, its registered pool, and the pulls it makes."""

    def __init__(self, pool: HostKvPool, agent: Any, agent_name: str) -> None:
        self.pool = pool
        self.agent = agent
        self.agent_name = agent_name
        self._reg = agent.register_memory([(pool.address, pool.size, 0, "")], "DRAM")
        self._local = agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            [(pool.block_address(i), pool.block_bytes, 0) for i in range(pool.num_blocks)],
            "DRAM",
        )
        self._peers: dict[str, asyncio.Future] = {}
        self._session = None
        # A READ that could not be cancelled may still write into the pool: then it is never unmapped.
        self._unreleased_reads = 0
        self.stored_tokens = 0
        self.read_bytes = 0
        self.read_blocks = 0
        self.verify_failed_blocks = 0
        self.failed_pulls = 0

    # --------------------------------------------------------------- serving
    def metadata(self, engine_id: str) -> dict[str, Any]:
        """What a decode worker needs to read this worker's blocks (``GET /kv_transfer/nixl_metadata``)."""
        p = self.pool
        return {
            "engine_id": engine_id,
            "agent_name": self.agent_name,
            "agent_metadata": base64.b64encode(self.agent.get_agent_metadata()).decode(),
            "mem_type": "DRAM",
            "base_address": p.address,
            "num_blocks": p.num_blocks,
            "block_size": p.block_size,
            "kv_bytes_per_token": p.token_bytes,
            "block_bytes": p.block_bytes,
        }

    def counters(self) -> dict[str, tuple[str, float]]:
        return {
            "mocker:nixl_stored_tokens_total": ("Token KV slots written into the host pool by engine steps.", self.stored_tokens),
            "mocker:nixl_read_bytes_total": ("KV bytes pulled from prefill workers with NIXL READ.", self.read_bytes),
            "mocker:nixl_read_blocks_total": ("KV blocks pulled from prefill workers with NIXL READ.", self.read_blocks),
            "mocker:nixl_verify_failed_blocks_total": ("Pulled blocks that did not hold the prompt's KV bytes.", self.verify_failed_blocks),
            "mocker:nixl_failed_pulls_total": ("Pulls that failed or did not verify; their prompts were computed here.", self.failed_pulls),
        }

    def gauges(self) -> dict[str, tuple[str, float]]:
        return {"mocker:nixl_pool_bytes": ("Host memory of the KV pool registered with NIXL.", self.pool.size)}

    # -------------------------------------------------------------- computing
    def store(self, batch: "Batch", sched: "Scheduler") -> None:
        """Write the KV bytes of the tokens ``batch`` computes (call before applying it)."""
        bs = self.pool.block_size
        for seq, num_new in zip(batch.seqs, batch.num_new):
            if seq.finished or num_new <= 0:
                continue
            start = seq.num_computed
            end = start + num_new
            hashes = sched.block_hashes(seq, (end - 1) // bs)
            self.pool.write(seq.blocks, seq.all_ids, hashes, start, end)
            self.stored_tokens += num_new

    # ---------------------------------------------------------------- pulling
    async def pull(self, seq: "Sequence", sched: "Scheduler") -> bool:
        """Read the prompt blocks ``seq`` misses from its prefill worker; True when they arrived intact."""
        if seq.finished:  # aborted before its pull began
            return False
        bs = self.pool.block_size
        first = seq.num_hit_tokens // bs
        dst = seq.blocks[first:]
        kv = sched.kv
        # An abort frees the request's blocks; they must not go to another request
        # while NIXL may still be writing into them.
        kv.touch(dst)
        try:
            params = seq.remote or {}
            src = _remote_block_ids(params, len(seq.blocks))[first:]
            peer = await self._peer(params)
            if any(b >= peer.num_blocks for b in src):
                raise KvTransferError(f"remote block ids beyond the prefill worker's {peer.num_blocks} blocks")
            await self._read(peer, src, dst)
            if seq.finished:
                return False
            hashes = sched.block_hashes(seq, (seq.prompt_len - 1) // bs)
            bad = self.pool.bad_blocks(seq.blocks, seq.all_ids, hashes, first * bs, seq.prompt_len)
            if bad:
                self.verify_failed_blocks += bad
                raise KvTransferError(f"{bad} of {len(dst)} pulled blocks do not hold this prompt's KV bytes")
            return True
        except KvTransferError as exc:
            self.failed_pulls += 1
            log.warning("KV pull for %s failed, computing its prompt here instead: %s", seq.request_id, exc)
            return False
        finally:
            kv.free(dst)

    async def _peer(self, params: dict) -> _Peer:
        eid, host, port = params.get("remote_engine_id"), params.get("remote_host"), params.get("remote_port")
        if not (isinstance(eid, str) and host and port):
            raise KvTransferError("kv_transfer_params lack remote_engine_id, remote_host or remote_port")
        fut = self._peers.get(eid)
        if fut is None:
            fut = self._peers[eid] = asyncio.ensure_future(self._handshake(eid, host, port))
        try:
            # Shielded: one request giving up must not cancel a handshake others wait on.
            return await asyncio.shield(fut)
        except KvTransferError:
            if self._peers.get(eid) is fut:
                del self._peers[eid]
            raise

    async def _handshake(self, eid: str, host: str, port: int) -> _Peer:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        url = f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}{METADATA_PATH}"
        t0 = time.monotonic()
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise KvTransferError(
                        f"{url} answered HTTP {resp.status}: is the prefill worker running with --kv-transfer nixl?"
                    )
                md = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise KvTransferError(f"cannot fetch NIXL metadata from {url}: {exc}") from None
        if not isinstance(md, dict):
            raise KvTransferError(f"{url} did not answer a JSON object")
        if md.get("engine_id") != eid:
            raise KvTransferError(f"{url} is engine {md.get('engine_id')!r}, not {eid!r} (restarted?)")
        if md.get("block_bytes") != self.pool.block_bytes or md.get("block_size") != self.pool.block_size:
            raise KvTransferError(
                f"block layout differs: prefill {md.get('block_size')} tokens x {md.get('kv_bytes_per_token')} B, "
                f"here {self.pool.block_size} x {self.pool.token_bytes} B (--block-size, --kv-bytes-per-token)"
            )
        try:
            name = self.agent.add_remote_agent(base64.b64decode(md["agent_metadata"]))
            base, bb, n = int(md["base_address"]), self.pool.block_bytes, int(md["num_blocks"])
            dlist = self.agent.prep_xfer_dlist(name, [(base + i * bb, bb, 0) for i in range(n)], "DRAM")
        except Exception as exc:  # nixl raises its own binding errors
            raise KvTransferError(f"NIXL refused the prefill worker's metadata: {exc}") from None
        log.info("NIXL peer %s (engine %s, %d blocks) added in %.1f ms", name, eid, n, (time.monotonic() - t0) * 1e3)
        return _Peer(name, dlist, n)

    async def _read(self, peer: _Peer, src: list[int], dst: list[int]) -> None:
        agent = self.agent
        try:
            handle = agent.make_prepped_xfer("READ", self._local, dst, peer.dlist, src)
            state = agent.transfer(handle)
        except Exception as exc:
            raise KvTransferError(f"NIXL could not start the READ: {exc}") from None
        try:
            deadline = time.monotonic() + READ_TIMEOUT
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise KvTransferError(f"the READ of {len(src)} blocks did not finish within {READ_TIMEOUT:g}s")
                await asyncio.sleep(POLL_SECONDS)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise KvTransferError(f"NIXL reported {state} for the READ of {len(src)} blocks")
            self.read_bytes += len(dst) * self.pool.block_bytes
            self.read_blocks += len(dst)
        finally:
            try:
                handle.release()
            except Exception as exc:  # a READ still in flight cannot always be cancelled
                self._unreleased_reads += 1
                log.warning("could not release a NIXL transfer handle: %s", exc)

    async def close(self) -> None:
        """Release every NIXL handle, deregister the pool and free it."""
        peers = [f.result() for f in self._peers.values() if f.done() and not f.cancelled() and f.exception() is None]
        for fut in self._peers.values():
            fut.cancel()
        self._peers.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        try:
            for peer in peers:
                peer.dlist.release()
            self._local.release()
            self.agent.deregister_memory(self._reg)
        except Exception as exc:
            log.info("NIXL cleanup: %s", exc)
        self.agent = None
        if not self._unreleased_reads:
            self.pool.close()


def _remote_block_ids(params: dict, expected: int) -> list[int]:
    ids = params.get("remote_block_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        ids = ids[0]  # one list per tensor-parallel rank; the mocker has one
    if not isinstance(ids, list) or not all(type(b) is int and b >= 0 for b in ids):
        raise KvTransferError("kv_transfer_params.remote_block_ids is not a list of block ids")
    if len(ids) != expected:
        raise KvTransferError(
            f"the prefill worker sent {len(ids)} blocks for a prompt of {expected} blocks here "
            "(same tokenizer and --block-size on both?)"
        )
    return ids


def open_nixl_transfer(cfg: MockerConfig) -> NixlKvTransfer:
    """Allocate the host KV pool, start a NIXL agent with UCX and register the pool.

    Sets ``UCX_NET_DEVICES=lo`` when the mocker binds a loopback address (unless
    already set), so UCX does not listen on every interface.
    """
    from dynamo.core.ports import is_loopback

    size = cfg.num_gpu_blocks * cfg.block_size * cfg.kv_bytes_per_token
    try:
        import psutil

        limit = psutil.virtual_memory().total // 2
    except ImportError:  # pragma: no cover - psutil is a declared dependency
        limit = 1 << 40
    if size > limit:
        raise NixlSetupError(
            f"--kv-transfer nixl needs a {size / 2**30:.1f} GiB host KV pool (--num-gpu-blocks "
            f"{cfg.num_gpu_blocks} x --block-size {cfg.block_size} x --kv-bytes-per-token "
            f"{cfg.kv_bytes_per_token}), more than half of this machine's memory; lower "
            "--kv-bytes-per-token (e.g. 256) or --num-gpu-blocks"
        )
    if is_loopback(cfg.host):
        os.environ.setdefault("UCX_NET_DEVICES", "lo")
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as exc:
        raise NixlSetupError(f"--kv-transfer nixl needs the nixl package ({exc}): {INSTALL_HINT}") from None
    # nixl logs to stdout, where the launcher looks for the ready line: use our stderr log.
    nixl_log = logging.getLogger("nixl")
    nixl_log.handlers.clear()
    nixl_log.propagate = True
    name = f"mocker-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    try:
        agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    except Exception as exc:
        raise NixlSetupError(f"cannot start a NIXL agent: {exc}") from None
    if "UCX" not in agent.backends:
        raise NixlSetupError("this nixl build has no UCX backend plugin; --kv-transfer nixl needs it")
    pool = HostKvPool(cfg.num_gpu_blocks, cfg.block_size, cfg.kv_bytes_per_token)
    try:
        transfer = NixlKvTransfer(pool, agent, name)
    except Exception as exc:
        pool.close()
        raise NixlSetupError(f"NIXL cannot register the {size} B host KV pool: {exc}") from None
    log.info(
        "NIXL agent %s: %d blocks x %d B registered (%.1f MiB host memory, UCX_NET_DEVICES=%s) in %.2fs",
        name, pool.num_blocks, pool.block_bytes, size / 2**20, os.environ.get("UCX_NET_DEVICES", "all"),
        time.monotonic() - t0,
    )
    return transfer
