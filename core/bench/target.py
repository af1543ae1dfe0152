"""``--profile P``: serve a profile with ``dynamo serve --detach``, hand back its endpoint, stop it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
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
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="dynamo-bench-run-"))
        self.timeout = timeout
        self.endpoint: str | None = None
        self._started = False
        self.stop_warning: str | None = None

    def _cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dynamo.cli.app", *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

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
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-10:]
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
        """Stop the run (as ``dynamo stop`` does). Returns a warning instead of raising."""
        if not self._started:
            return None
        self._started = False
        try:
            proc = self._cli("stop", str(self.run_dir), timeout=180)
        except subprocess.TimeoutExpired:
            self.stop_warning = f"dynamo stop {self.run_dir} timed out"
            return self.stop_warning
        if proc.returncode != 0:
            self.stop_warning = f"dynamo stop {self.run_dir} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
            return self.stop_warning
        return None

    def __enter__(self) -> "ServedProfile":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
