"""Block hashing for routing (DESIGN.md): chained xxh3-64 over full blocks of token ids.

Block ``i`` with token ids ``t``: ``local = xxh3_64(u32le(t))``; the first block's hash is
``local`` (or ``xxh3_64(u64le(parent) + u64le(local))`` when a parent is given), every
later block's is ``xxh3_64(u64le(previous) + u64le(local))``. A trailing partial block is
ignored. The frontend hashes a request's tokens this way; the router hashes the token ids
carried by KV events the same way, so engine-internal hashes never matter.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
_PAIR = struct.Struct("<QQ")
_FORMATS: dict[int, struct.Struct] = {}


def _block_struct(block_size: int) -> struct.Struct:
    fmt = _FORMATS.get(block_size)
    if fmt is None:
        fmt = _FORMATS[block_size] = struct.Struct(f"<{block_size}I")
    return fmt


def chain_block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
    """The chained hash of every full block of ``token_ids`` (unsigned 64-bit ints)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    pack = _block_struct(block_size).pack
    out: list[int] = []
    parent = parent_hash
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        local = _xxh3(pack(*token_ids[start:start + block_size]))
        parent = local if parent is None else _xxh3(_PAIR.pack(parent, local))
        out.append(parent)
    return out
