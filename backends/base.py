"""The small interface every backend implements: how to launch one worker for a role."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dynamo.core.errors import PlanError
from dynamo.core.profile import Profile, ReadinessProbe, WorkerGroup


@dataclass
class WorkerContext:
    """Everything the plan decided about one worker replica."""

    profile: Profile
    group_name: str
    group: WorkerGroup
    replica: int
    name: str
    host: str
    port: int
    gpus: list[int]
    allocate_port: Callable[[], int]
    # True when --backend replaced the profile's own backend: its args were written for another engine
    args_from_other_backend: bool = False


@dataclass
class WorkerLaunch:
    """What a backend returns: the process to start and how to tell it is ready."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    readiness_probe: ReadinessProbe = field(default_factory=lambda: ReadinessProbe(http_get={"path": "/health"}))
    discovery: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # files the supervisor writes before starting the process: path (may contain {run_dir}) -> content
    files: dict[str, str] = field(default_factory=dict)


class Backend:
    """Base class: subclasses set the attributes and implement ``launch``."""

    name: str = ""
    uses_gpus: bool = True
    default_grace_period: float = 30.0
    default_startup_timeout: float = 600.0
    # flag -> the profile key to use instead; these are set by the launcher
    owned_flags: dict[str, str] = {}
    # flags the engine accepts; empty means unknown (no check)
    known_flags: frozenset[str] = frozenset()

    def launch(self, ctx: WorkerContext) -> WorkerLaunch:
        raise NotImplementedError

    def missing_executable(self) -> str | None:
        """A message saying what to install when the engine is not available here, else None."""
        return None

    def engine_flags(self, ctx: WorkerContext, notes: list[str]) -> list[str]:
        """The profile's ``args:`` as flags, refusing flags the launcher owns or the engine lacks.

        Args written for another engine (the profile's backend was replaced with --backend)
        that this engine does not know are dropped, and each drop is noted in the plan.
        """
        kept: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in ctx.group.args.items():
            flag = key.lstrip("-")
            if flag in self.owned_flags and not ctx.args_from_other_backend:
                problems.append(f"workers.{ctx.group_name}.args.{key}: the launcher sets --{flag} itself; "
                                f"use {self.owned_flags[flag]} in the profile instead")
                continue
            base = flag[3:] if flag.startswith("no-") else flag
            if self.known_flags and base not in self.known_flags or flag in self.owned_flags:
                if ctx.args_from_other_backend:
                    notes.append(dropped_note(flag, self.name, self.known_flags))
                    continue
                hint = difflib.get_close_matches(base, sorted(self.known_flags), n=1, cutoff=0.6)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                problems.append(f"workers.{ctx.group_name}.args.{key}: {self.name} has no flag --{flag}{suggestion}")
                continue
            kept[key] = value
        if problems:
            raise PlanError("\n".join(problems))
        return args_to_flags(kept)


def dropped_note(flag: str, engine: str, known) -> str:
    """The plan note for an arg written for another engine and dropped for ``engine``; a near twin
    among ``engine``'s flags is named, since that is more likely a typo than another engine's flag."""
    twin = difflib.get_close_matches(flag, sorted(known or ()), n=1, cutoff=0.85)
    return f"dropped --{flag} (not a {engine} flag{f'; did you mean {twin[0]!r}?' if twin else ''})"


def one_token_warmup(ctx: WorkerContext) -> dict:
    """A one-token completion with standard fields only (TensorRT-LLM rejects unknown ones)."""
    return {"path": "/v1/completions", "json": {"model": ctx.profile.model.name, "prompt": "ping", "max_tokens": 1}}


def args_to_flags(args: dict[str, Any]) -> list[str]:
    """``{max-num-seqs: 8, enforce-eager: true, x: {a: 1}}`` → ``--max-num-seqs 8 --enforce-eager --x '{"a": 1}'``.

    ``false`` becomes ``--no-<flag>`` (argparse BooleanOptionalAction), ``null`` drops the flag,
    lists repeat values after one flag, mappings are passed as JSON.
    """
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.lstrip("-")
        if value is None:
            continue
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.lstrip("-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, separators=(",", ":"))]
        elif isinstance(value, list):
            flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def model_dir(profile: Profile) -> Path | None:
    """The model's local directory, when its path is one."""
    path = Path(profile.model.source).expanduser()
    return path if path.is_dir() else None


def custom_launch(ctx: WorkerContext) -> WorkerLaunch:
    """A worker group's own ``command:`` with its placeholders filled in."""
    values = {
        "host": ctx.host, "port": str(ctx.port), "model": ctx.profile.model.name,
        "model_path": ctx.profile.model.source, "gpus": ",".join(map(str, ctx.gpus)), "replica": str(ctx.replica),
    }
    argv = []
    for part in ctx.group.command or []:
        try:
            argv.append(part.format(**values))
        except (KeyError, IndexError, ValueError) as exc:
            raise PlanError(
                f"workers.{ctx.group_name}.command: cannot fill {part!r} ({exc}); "
                f"placeholders are {', '.join('{' + k + '}' for k in values)}; write {{{{ }}}} for a literal brace"
            ) from None
    return WorkerLaunch(argv=argv)
