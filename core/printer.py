"""The console: one multiplexed stream, ``name |`` prefixes padded and coloured per process."""

from __future__ import annotations

import os
import sys
import zlib
from typing import TextIO

_PALETTE = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94, 91)
_SYSTEM = "dynamo"


def colour_of(name: str) -> int:
    """A stable ANSI colour per name (the same name keeps its colour across runs)."""
    return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


def wants_colour(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty()


class Printer:
    def __init__(self, names: list[str], stream: TextIO | None = None, colour: bool | None = None):
        self.stream = stream or sys.stdout
        self.colour = wants_colour(self.stream) if colour is None else colour
        self.width = max([len(n) for n in names] + [len(_SYSTEM)])

    def _prefix(self, name: str, code: int) -> str:
        label = f"{name:<{self.width}} |"
        return f"\x1b[{code}m{label}\x1b[0m " if self.colour else f"{label} "

    def output(self, name: str, line: str) -> None:
        """A line a process printed."""
        self._write(self._prefix(name, colour_of(name)) + line)

    def system(self, text: str, error: bool = False) -> None:
        """A lifecycle line from the supervisor itself."""
        body = f"\x1b[1;31m{text}\x1b[0m" if error and self.colour else text
        self._write(self._prefix(_SYSTEM, 1) + body)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe, or a terminal that hung up (EIO): the run goes on
            pass
