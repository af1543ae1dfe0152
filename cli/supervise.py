"""Entry point of a detached supervisor: ``python -m dynamo.cli.supervise RUN_DIR``.

``dynamo serve --detach`` writes the plan into the run directory, starts this in its own
session with its console going to RUN_DIR/supervisor.log, and waits for state.json to
say ready.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynamo.cli.serving import load_plan
from dynamo.core.printer import Printer
from dynamo.core.rundir import RunDir
from dynamo.core.supervisor import run_plan


def main() -> None:
    run = RunDir(Path(sys.argv[1]))
    plan = load_plan(run)
    printer = Printer([p.name for p in plan.processes], colour=False)
    sys.exit(run_plan(plan, run, printer))


if __name__ == "__main__":
    main()
