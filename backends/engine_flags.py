"""What the real engines (vLLM, SGLang, TensorRT-LLM) share.

* Their documented flag lists (``<engine>_flags.txt``, copies of the reference lists: one
  ``--flag<TAB>takes-value|switch<TAB>default`` line per flag, notes in ``#`` lines), parsed
  into a ``FlagList``.
* ``EngineBackend``: turns a worker group's ``args:`` into flags checked against that list
  (flags the launcher owns are refused with the profile key to use; unknown flags with the
  nearest documented one), sizes tensor parallelism from the GPUs per replica, decides where
  the engine listens and publishes, and validates a planned argv with the engine's own
  argument parser when the engine is installed.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dynamo.backends.base import Backend, WorkerContext, dropped_note
from dynamo.core.errors import PlanError
from dynamo.core.ports import is_loopback  # noqa: F401  (the engine modules import it from here)

FLAG_DIR = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- flag lists


@dataclass(frozen=True)
class Flag:
    name: str  # without the leading dashes
    takes_value: bool
    default: str


@dataclass(frozen=True)
class FlagList:
    """The flags one engine command documents."""

    engine: str
    source: str
    flags: dict[str, Flag]
    many: frozenset[str]  # takes several values after one flag (argparse nargs + / * / ?)
    repeated: frozenset[str]  # given once per value (Click multiple=True)
    abbreviations: bool  # argparse allow_abbrev: a unique prefix names a flag
    dotted: bool  # JSON flags accept dotted sub-keys (vLLM: --kv-transfer-config.kv_role=...)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.flags)

    def resolve(self, key: str) -> str | list[str] | None:
        """The documented flag a profile key names, a list when an abbreviation is ambiguous, else None.

        The spelling may differ in ``-`` versus ``_`` (vLLM accepts both; TensorRT-LLM only
        knows underscores, SGLang only dashes), so the engine's own spelling is returned.
        """
        for candidate in (key, key.replace("_", "-"), key.replace("-", "_")):
            if candidate in self.flags:
                return candidate
        if self.abbreviations:
            matches = [name for name in self.flags if name.startswith(key.replace("_", "-"))]
            if len(matches) == 1:
                return matches[0]
            if matches:
                return sorted(matches)
        return None

    def nearest(self, key: str) -> str | None:
        for candidate in (key, key.replace("_", "-"), key.replace("-", "_")):
            match = difflib.get_close_matches(candidate, sorted(self.flags), n=1, cutoff=0.6)
            if match:
                return match[0]
        return None

    def argparser(self) -> argparse.ArgumentParser:
        """A parser with exactly the documented flags and their arity (for contract tests)."""
        parser = argparse.ArgumentParser(prog=self.engine, allow_abbrev=self.abbreviations, add_help=False)
        for flag in self.flags.values():
            if flag.name == "help":
                continue
            if not flag.takes_value:
                parser.add_argument(f"--{flag.name}", action="store_true")
            elif flag.name in self.many:
                parser.add_argument(f"--{flag.name}", nargs="+")
            elif flag.name in self.repeated:
                parser.add_argument(f"--{flag.name}", action="append")
            else:
                parser.add_argument(f"--{flag.name}")
        return parser


_SECTION = re.compile(r"^# -{8,} (\S+)")
_NARGS = re.compile(r"^#\s+--([A-Za-z0-9_.-]+) nargs=([+*?])")
_MULTIPLE = re.compile(r"multiple=True \(repeat the flag\): (.+?)\.?$")


@lru_cache(maxsize=None)
def load_flag_list(filename: str, engine: str, section: str | None = None, abbreviations: bool = False,
                   dotted: bool = False) -> FlagList:
    """Parse ``backends/<filename>``; with ``section``, only the flags under that ``# ---- name`` header."""
    path = FLAG_DIR / filename
    flags: dict[str, Flag] = {}
    many: set[str] = set()
    repeated: set[str] = set()
    current: str | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        header = _SECTION.match(line)
        if header:
            current = header.group(1)
            continue
        nargs = _NARGS.match(line)
        if nargs:
            many.add(nargs.group(1))
            continue
        multiple = _MULTIPLE.search(line)
        if multiple:
            repeated.update(part.strip().lstrip("-") for part in multiple.group(1).split(","))
            continue
        if not line.startswith("--"):
            continue
        if section is not None and current not in (None, section):
            continue
        name, kind, default = (line.split("\t") + ["", ""])[:3]
        name = name.lstrip("-")
        flags.setdefault(name, Flag(name=name, takes_value=kind == "takes-value", default=default))
    return FlagList(engine=engine, source=filename, flags=flags, many=frozenset(many), repeated=frozenset(repeated),
                    abbreviations=abbreviations, dotted=dotted)


# ----------------------------------------------------------------------------- hosts




def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "*")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def url_host(host: str) -> str:
    """A host as it appears in a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


def advertised_host(ctx: WorkerContext) -> str:
    """The address other processes use to reach this worker's side ports.

    A wildcard listen address says nothing about that: the worker's node address is used
    (multinode profiles), else loopback.
    """
    if not is_wildcard(ctx.host):
        return ctx.host
    for node in ctx.profile.nodes.values():
        if ctx.group_name in node.run:
            return node.address
    return "127.0.0.1"


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# ----------------------------------------------------------------------------- backend


class EngineBackend(Backend):
    """A real engine's OpenAI server, launched with flags checked against its documented list."""

    flag_file: str = ""
    flag_section: str | None = None
    abbreviations: bool = False
    dotted_subkeys: bool = False
    # every spelling of the pipeline-parallel flag: tensor parallel = GPUs per replica / pipeline parallel
    pipeline_flags: tuple[str, ...] = ()
    default_grace_period = 60.0

    @property
    def flags(self) -> FlagList:
        return load_flag_list(self.flag_file, self.name, self.flag_section, self.abbreviations, self.dotted_subkeys)

    @property
    def known_flags(self) -> frozenset[str]:  # type: ignore[override]
        return self.flags.names

    # ------------------------------------------------------------------ args -> flags

    def engine_flags(self, ctx: WorkerContext, notes: list[str]) -> list[str]:
        return self.convert_args(ctx, ctx.group.args, notes)

    def convert_args(self, ctx: WorkerContext, args: dict[str, Any], notes: list[str]) -> list[str]:
        """The profile's ``args:`` as flags in the engine's own spelling.

        ``true`` is a bare switch, ``false`` the ``--no-`` form when the engine has one (else
        the switch is left off), ``null`` drops the flag, a mapping is passed as JSON, a list
        is spread after one flag when the flag takes several values (repeated for Click's
        ``multiple``), else passed as JSON. Under ``--backend`` replacing the profile's own
        engine, flags this engine lacks or owns are dropped with a note instead.
        """
        out: list[str] = []
        problems: list[str] = []
        for key, value in args.items():
            try:
                out += self._convert_arg(ctx, key, value, notes)
            except PlanError as exc:
                problems.append(str(exc))
        if problems:
            raise PlanError("\n".join(problems))
        return out

    def _convert_arg(self, ctx: WorkerContext, key: str, value: Any, notes: list[str]) -> list[str]:
        """One ``args:`` entry as flags (none when it is dropped); raises PlanError when it is refused."""
        where = f"workers.{ctx.group_name}.args.{key}"
        raw = str(key).lstrip("-")
        base, dot, sub = raw.partition(".")
        if dot and not self.flags.dotted:
            self._unknown(ctx, where, raw, notes)
            return []
        resolved = self.flags.resolve(base)
        if isinstance(resolved, list):
            if ctx.args_from_other_backend:
                notes.append(f"dropped --{raw} (ambiguous for {self.name})")
                return []
            raise PlanError(f"{where}: --{base} is ambiguous for {self.name}: it could be "
                            + ", ".join(f"--{m}" for m in resolved))
        owned = self._owner(resolved or base)
        if owned is not None:
            if ctx.args_from_other_backend:
                notes.append(f"dropped --{raw} (set by the launcher for {self.name})")
                return []
            advice = owned if owned.startswith("remove it") else f"use {owned} in the profile instead"
            raise PlanError(f"{where}: the launcher sets --{resolved or base} itself; {advice}")
        if resolved is None:
            self._unknown(ctx, where, raw, notes)
            return []
        if dot:
            if value is None:
                return []
            return [f"--{resolved}.{sub}", compact_json(value) if isinstance(value, (dict, list)) else _scalar(value)]
        return self._flag_values(where, self.flags.flags[resolved], value)

    def _owner(self, flag: str) -> str | None:
        for candidate in (flag, flag.replace("_", "-"), flag.replace("-", "_")):
            if candidate in self.owned_flags:
                return self.owned_flags[candidate]
        return None

    def _unknown(self, ctx: WorkerContext, where: str, flag: str, notes: list[str]) -> None:
        if ctx.args_from_other_backend:
            notes.append(dropped_note(flag, self.name, self.flags.flags))
            return
        hint = self.flags.nearest(flag.partition(".")[0])
        suggestion = (f"; did you mean {hint!r}?" if hint
                      else f"; the flags {self.name} documents are listed in backends/{self.flags.source}")
        raise PlanError(f"{where}: {self.name} has no flag --{flag}{suggestion}")

    def _flag_values(self, where: str, flag: Flag, value: Any) -> list[str]:
        name = f"--{flag.name}"
        if value is None:
            return []
        if value is True:
            return [name] if not flag.takes_value else [name, "true"]
        if value is False:
            if flag.takes_value:
                return [name, "false"]
            negative = "no-" + flag.name
            if negative in self.flags.flags:
                return [f"--{negative}"]
            if flag.default.lower() == "true":
                raise PlanError(f"{where}: --{flag.name} is on by default and {self.name} has no --{negative} to turn it off")
            return []
        if not flag.takes_value:
            raise PlanError(f"{where}: --{flag.name} is a switch: write true or false (got {value!r})")
        if isinstance(value, dict):
            return [name, compact_json(value)]
        if isinstance(value, list):
            if flag.name in self.flags.repeated:
                return [part for item in value for part in (name, _scalar(item))]
            if flag.name in self.flags.many:
                return [name, *(_scalar(item) for item in value)]
            return [name, compact_json(value)]
        return [name, _scalar(value)]

    # ------------------------------------------------------------------ parallelism

    def tensor_parallel_size(self, ctx: WorkerContext) -> int:
        """GPUs per replica divided by the pipeline-parallel size the args ask for."""
        group = ctx.group
        per_replica = group.gpus if isinstance(group.gpus, int) else len(group.gpus) // max(1, group.replicas)
        per_replica = max(1, per_replica)
        pipeline = 1
        for key, value in group.args.items():
            if str(key).lstrip("-") in self.pipeline_flags and value is not None:
                try:
                    pipeline = int(value)
                except (TypeError, ValueError):
                    raise PlanError(f"workers.{ctx.group_name}.args.{key}: expected a whole number, got {value!r}") from None
        if pipeline < 1 or per_replica % pipeline:
            raise PlanError(
                f"workers.{ctx.group_name}.gpus: {per_replica} GPUs per replica cannot be split into "
                f"{pipeline} pipeline stages; tensor parallel size = GPUs per replica / pipeline stages"
            )
        return per_replica // pipeline

    # ------------------------------------------------------------------ validation by the engine

    # Python run by the engine's interpreter: parse each argv (a JSON list on stdin) with the
    # engine's own parser; print a JSON list of error messages (null = accepted).
    validator_script: str = ""

    def validator_argv(self, argv: list[str]) -> tuple[list[str], list[str]] | None:
        """(interpreter command, the engine's arguments) for one planned argv, or None to skip."""
        return None

    def validate_argv(self, argv: list[str]) -> str | None:
        """The engine's own complaint about this argv, or None (accepted, or the engine is not installed)."""
        return self.validate_argvs([argv])[0]

    def validate_argvs(self, argvs: list[list[str]], timeout: float = 180.0) -> list[str | None]:
        """Validate several argvs in one engine import (importing an engine takes seconds)."""
        results: list[str | None] = [None] * len(argvs)
        batches: dict[tuple[str, ...], list[tuple[int, list[str]]]] = {}
        for index, argv in enumerate(argvs):
            split = self.validator_argv(argv)
            if split is not None and self.validator_script:
                batches.setdefault(tuple(split[0]), []).append((index, split[1]))
        for command, items in batches.items():
            try:
                done = subprocess.run(
                    [*command, "-c", self.validator_script], input=json.dumps([args for _, args in items]),
                    capture_output=True, text=True, timeout=timeout,
                )
                answers = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
                answers = None
            if not isinstance(answers, list) or len(answers) != len(items):
                continue  # the engine could not be imported here: nothing to say
            for (index, _), answer in zip(items, answers):
                results[index] = f"{self.name} rejects the planned flags: {answer}" if answer else None
        return results


def _scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


# Shared by the argparse engines (vLLM, SGLang): run ``parse(args)`` per argv, catching argparse's exit.
ARGPARSE_VALIDATOR = r"""
import contextlib, io, json, sys
argvs = json.load(sys.stdin)
{setup}
out = []
for args in argvs:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(args)
        out.append(None)
    except SystemExit as exc:
        lines = [l for l in err.getvalue().splitlines() if l.strip()]
        msg = next((l.split("error:", 1)[1].strip() for l in reversed(lines) if "error:" in l), None)
        out.append(msg or (lines[-1] if lines else "exit %s" % exc.code))
    except Exception as exc:
        out.append("%s: %s" % (type(exc).__name__, exc))
print(json.dumps(out))
"""
