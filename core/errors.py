"""Errors a user can cause. The CLI catches these once and prints one clear message (exit 2)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: a profile, a flag, a port, a missing executable.

    The message is shown as is, so it must say what was wrong and what to do.
    """

    exit_code = 2


class ProfileError(UsageError):
    """A profile that cannot be loaded or validated.

    ``problems`` holds one line per problem, each naming file:line:column and the key path.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PlanError(UsageError):
    """A profile that is valid on its own but cannot be planned on this machine."""


class RunNotFound(UsageError):
    """No run matches what the user asked for."""
