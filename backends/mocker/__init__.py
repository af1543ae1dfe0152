"""The mocker backend: a simulated vLLM engine (``python -m dynamo.backends.mocker``).

Importing this package is cheap (no aiohttp, zmq or tokenizers): the launcher
uses :func:`mocker_command` to build the worker's argv, :data:`READY_MARKER`
to recognise its readiness line, and :func:`chain_block_hashes` /
:func:`load_tokenizer` to hash prompts the way the mocker does.
"""

from __future__ import annotations

from .config import READY_MARKER, MockerConfig, mocker_command

__all__ = ["MockerConfig", "READY_MARKER", "mocker_command", "chain_block_hashes", "load_tokenizer"]


def __getattr__(name: str):
    if name == "chain_block_hashes":
        from .kv_cache import chain_block_hashes

        return chain_block_hashes
    if name == "load_tokenizer":
        from dynamo.core.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
