"""``--profile P``: serve a profile with ``dynamo serve --detach``, hand back its endpoint, stop it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["ServeFailed", "ServedProfile"]


class ServeFailed(Exception):
    """``dynamo serve`` did not come up (a runtime failure: exit 1)."""


class ServedProfile:
    """A profile served for the length of a benchmark (context manager)."""

    def __init__(self, profile: str, serve_args: list[str] | None = None, run_dir: Path | None = None,
                 timeout: float = 900.0):
        self.profile = profile
        self.serve_args = list(serve_args or [])
        self.temporary = run_dir is None  # made here, so removed here (see remove)
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="dynamo-bench-run-"))
        self.timeout = timeout
        self.endpoint: str | None = None
        self._started = False
        self.stop_warning: str | None = None

    def _cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        # In a session of its own: a Ctrl-C at the terminal reaches bench only, which decides (a
        # `dynamo stop` killed half way would leave the run behind).
        return subprocess.run([sys.executable, "-m", "dynamo.cli.app", *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, start_new_session=True)

    def start(self) -> str:
        """Serve the profile; return the OpenAI endpoint URL."""
        self._started = True
        try:
            proc = self._cli("serve", self.profile, "--detach", "--run-dir", str(self.run_dir), "--no-color",
                             *self.serve_args, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise ServeFailed(f"dynamo serve {self.profile} was not ready within {self.timeout:g}s "
                              f"(logs in {self.run_dir})") from None
        if proc.returncode != 0:
            # our caller prefixes each line with "error: " again
            detail = [line.removeprefix("error: ")
                      for line in (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-10:]]
            msg = f"dynamo serve {self.profile} failed (exit {proc.returncode})"
            if proc.returncode == 2:
                from dynamo.core.errors import UsageError

                raise UsageError(msg + ":\n" + "\n".join(detail))
            raise ServeFailed(msg + ":\n" + "\n".join(detail))
        match = re.search(r"^endpoint:\s*(\S+)", proc.stdout, re.MULTILINE)
        endpoint = match.group(1) if match else None
        if endpoint is None:
            try:
                endpoint = json.loads((self.run_dir / "state.json").read_text()).get("endpoint")
            except (OSError, ValueError):
                endpoint = None
        if not endpoint:
            raise ServeFailed(f"dynamo serve {self.profile} did not report an endpoint (run dir {self.run_dir})")
        self.endpoint = endpoint
        return endpoint

    def stop(self) -> str | None:
        """Stop the run (as ``dynamo stop`` does). Returns a warning instead of raising.

        Also right after an interrupted :meth:`start`: a supervisor that was already on its way is
        waited for and stopped; when none was started (a bad profile, a port taken) there is nothing to do.
        """
        if not self._started:
            return None
        self._started = False
        if not self._supervisor_started():
            return None
        try:
            proc = self._cli("stop", str(self.run_dir), timeout=180)
        except subprocess.TimeoutExpired:
            self.stop_warning = f"dynamo stop {self.run_dir} timed out"
            return self.stop_warning
        if proc.returncode != 0:
            self.stop_warning = f"dynamo stop {self.run_dir} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
            return self.stop_warning
        return None

    def _supervisor_started(self, wait: float = 15.0) -> bool:
        """Whether this run has a supervisor to stop; waits (bounded) for one still starting to write its
        state. ``dynamo serve`` hands its lock on the run directory to the supervisor it starts, so a lock
        held by someone else (``dynamo serve`` itself has exited by now) is a supervisor."""
        from dynamo.core.rundir import RunDir

        run = RunDir(self.run_dir)
        deadline = time.monotonic() + wait
        while True:
            if run.read_state().get("supervisor_pid"):
                return True
            if not run.locked():
                return run.state_path.exists()
            if time.monotonic() > deadline:
                return True  # let dynamo stop say what it finds
            time.sleep(0.1)

    def remove(self) -> None:
        """Delete a temporary run directory (and the link ``dynamo serve`` made to it in $DYNAMO_HOME/runs)."""
        if not self.temporary:
            return
        from dynamo.core.rundir import dynamo_home

        link = dynamo_home() / "runs" / self.run_dir.name
        try:
            if link.is_symlink() and link.resolve() == self.run_dir.resolve():
                link.unlink()
        except OSError:
            pass
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "ServedProfile":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
