"""The run's sentinel: kills what is left of a run when its supervisor dies.

Started by the supervisor in its own session with the read end of a pipe as stdin. The
supervisor never writes; when it dies (even by SIGKILL) the pipe closes, the read returns,
and the sentinel SIGKILLs every process carrying the run's marker in its environment.
Direct children already die by their parent-death signal; this catches the descendants
that escaped into other groups or sessions.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def sweep(run_id: str) -> int:
    from dynamo.core.proctree import marked_processes, signal_all

    killed = 0
    for _ in range(20):
        found = marked_processes(run_id)
        if not found:
            break
        signal_all(None, found, signal.SIGKILL)
        killed += len(found)
        time.sleep(0.05)
    return killed


def main() -> None:
    run_id = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    sweep(run_id)


if __name__ == "__main__":
    main()
