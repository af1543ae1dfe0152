"""Stopping on signals the way a terminal user expects, for the supervisor and the CLI alike.

SIGHUP means the terminal that started the command is gone: stop as for Ctrl-C, and stop
writing to that terminal (a write to a hung-up tty fails with EIO). A SIGHUP that was ignored
when the command started (``nohup``) stays ignored: the user asked to outlive the terminal.
"""

from __future__ import annotations

import os
import signal


def stop_signals() -> tuple[int, ...]:
    """SIGINT, SIGTERM and, unless it is ignored (nohup), SIGHUP."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


def terminal_fds() -> list[int]:
    """Which of stdout and stderr are a terminal now (ask before a hang-up: after it the check fails)."""
    found = []
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                found.append(fd)
        except OSError:
            pass
    return found


def silence(fds: list[int]) -> None:
    """Point ``fds`` (a hung-up terminal) at /dev/null, so that later output is dropped, not an error."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in fds:
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def say(text: str) -> None:
    """A line on stderr from a signal handler or a shutdown path: never raises."""
    try:
        os.write(2, text.encode() + b"\n")
    except OSError:
        pass


class StopSignals:
    """A context manager catching :func:`stop_signals` for a command's foreground work.

    Subclasses say what a signal does in :meth:`on_signal`; a SIGHUP first points the terminal's
    stdout/stderr at /dev/null. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self._terminal: list[int] = []
        self._previous: dict = {}

    def __enter__(self):
        self._terminal = terminal_fds()  # asked now: after a hang-up the question itself fails
        for sig in stop_signals():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGHUP:
            silence(self._terminal)
        self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        raise NotImplementedError
