"""Profiles: a YAML topology validated into typed models.

Loading keeps line numbers (ruamel.yaml), expands ``${VAR}`` / ``${VAR:-default}`` in
string values, applies ``--set key.path=value`` overrides, then validates with pydantic.
Every problem becomes one line naming file:line:column and the key path, with the
nearest valid key suggested for typos.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from dynamo.core.durations import Duration
from dynamo.core.errors import ProfileError
from dynamo.core.routing import DEFAULT_OVERLAP_WEIGHT
from dynamo.core.text import quantity

SHIPPED_PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
BACKENDS = ("mocker", "vllm", "sglang", "trtllm")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(Strict):
    """The model every worker serves."""

    name: str = Field(min_length=1, description="Served model name, as clients pass it in `model`.")
    path: str | None = Field(None, description="Local directory or hub id of the weights and tokenizer; defaults to name.")
    block_size: int = Field(16, gt=0, description="KV cache block (page) size in tokens.")
    max_model_len: int | None = Field(None, gt=0, description="Longest prompt plus output, in tokens.")

    @property
    def source(self) -> str:
        return self.path or self.name


class HttpGet(Strict):
    path: str = "/health"
    port: int | None = Field(None, description="Defaults to the process's own HTTP port.")


class HttpPost(Strict):
    """A request that must succeed once before the process counts as ready (e.g. a one-token completion)."""

    path: str
    json_body: dict[str, Any] = Field(default_factory=dict, alias="json")
    port: int | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ReadinessProbe(Strict):
    """How the supervisor decides a process is ready, and later that it is still healthy.

    Exactly one of http_get, tcp_socket, log_line; left out, the backend's default applies.
    """

    http_get: HttpGet | None = None
    tcp_socket: bool | None = Field(None, description="Ready once the process's port accepts a TCP connection.")
    log_line: str | None = Field(None, description="Ready once a line of output matches this regular expression.")
    warmup: HttpPost | None = Field(None, description="After the probe first passes, this POST must return 2xx once "
                                    "(engines answer /health before they can generate).")
    initial_delay: Duration = 0.0
    period: Duration = 0.5
    timeout: Duration = 2.0
    failure_threshold: int = Field(3, ge=1, description="Consecutive failures after readiness that mark the process unhealthy.")
    startup_timeout: Duration | None = Field(None, description="Give up if not ready after this long (backend default).")

    @field_validator("log_line")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ReadinessProbe:
        kinds = [k for k in ("http_get", "tcp_socket", "log_line") if getattr(self, k)]
        if len(kinds) > 1:
            raise ValueError(f"choose one of http_get, tcp_socket, log_line (got {', '.join(kinds)})")
        return self

    def merged_over(self, default: ReadinessProbe) -> ReadinessProbe:
        """This probe with unset fields taken from ``default``."""
        data = default.model_dump()
        data.update(self.model_dump(exclude_unset=True))
        if any(self.model_dump(exclude_unset=True).get(k) for k in ("http_get", "tcp_socket", "log_line")):
            for k in ("http_get", "tcp_socket", "log_line"):
                if k not in self.model_fields_set:
                    data[k] = None
        return ReadinessProbe.model_validate(data)


class Backoff(Strict):
    initial: Duration = 1.0
    max: Duration = 30.0
    multiplier: float = Field(2.0, ge=1.0)
    jitter: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of the delay added or removed at random.")


class RestartPolicy(Strict):
    policy: Literal["no", "on-failure", "always"] = "on-failure"
    max_restarts: int = Field(5, ge=0, description="Restarts allowed before the component is marked failed.")
    backoff: Backoff = Backoff()
    reset_after: Duration = Field(60.0, description="Running this long without a failure resets the restart count.")


class NatsSpec(Strict):
    """Embedded nats-server (default) or an external ``nats://`` URL."""

    url: str | None = Field(None, description="External NATS; when set nothing is started.")
    host: str = "127.0.0.1"
    port: int = Field(4222, ge=0, le=65535, description="0 has the OS pick a free port (with nodes: the next "
                      "port from ports.base, so that every node plans the same one).")
    token: str | None = Field(
        None, description="Auth token (required when binding a non-loopback address): letters, digits and "
        ". _ ~ + = - (it travels in a nats:// URL; `openssl rand -hex 32` makes one).")

    @field_validator("token")
    @classmethod
    def _url_safe(cls, value: str | None) -> str | None:
        # other characters break the nats:// URL (: / @ ? #) or the config file; the value is not echoed
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._~+=-]+", value):
            raise ValueError("may hold only letters, digits and . _ ~ + = - (it travels in a nats:// URL); "
                             "`openssl rand -hex 32` makes one")
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value == "embedded":
                return {}
            if value.startswith(("nats://", "tls://")):
                return {"url": value}
            raise ValueError(f"expected 'embedded' or a nats:// URL, got {value!r}")
        return value

    @property
    def embedded(self) -> bool:
        return self.url is None


class FrontendSpec(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 has the OS pick a free port.")
    migration_limit: int = Field(3, ge=0, description="Times a stream broken midway may move to another worker.")
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer <key>' (use ${VAR}).")
    max_body_mb: float = Field(32.0, gt=0, description="Largest request body accepted, in MiB; a larger one gets "
                               "413 with an OpenAI-style error.")
    readiness_probe: ReadinessProbe = ReadinessProbe()
    grace_period: Duration = 10.0
    restart: RestartPolicy | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)


class RouterSpec(Strict):
    mode: Literal["round_robin", "random", "least_loaded", "kv"] = "round_robin"
    overlap_weight: float = Field(
        DEFAULT_OVERLAP_WEIGHT, ge=0.0, description="KV cost = overlap_weight × prefill blocks + decode blocks. Higher keeps prefixes "
        "where they are cached; a busy holder still sheds load once its active requests' blocks exceed another "
        "worker's by about overlap_weight × the prefix's blocks (NVIDIA Dynamo defaults to 1).")
    temperature: float = Field(0.0, ge=0.0, description="0 picks the lowest cost; > 0 samples by softmax.")
    placement: Literal["process", "frontend"] = Field(
        "process", description="kv mode: run the router as its own process (asked over NATS) or inside the "
        "frontend (no network hop per decision; each frontend keeps its own index).")
    kv_events: bool = Field(True, description="Follow workers' KV events; false predicts caches from decisions.")
    approx_ttl: Duration = Field(120.0, description="Approximate mode: how long a routed prefix counts as cached.")
    step_tokens: int = Field(
        8192, ge=0, description="kv mode: prefill tokens an engine batches into one step (vLLM max_num_batched_tokens, "
        "SGLang chunked_prefill_size, TensorRT-LLM max_num_tokens). A worker's queued prefill counts only where it "
        "cannot share a step with the request's own; 0 counts the whole queue, as NVIDIA Dynamo does.")
    timeout: Duration = Field(0.1, description="The frontend routes round-robin when the router has not answered by then.")
    disagg_threshold: int = Field(
        0, ge=0, description="Prompts whose uncached part is shorter than this many tokens skip the prefill workers.")
    readiness_probe: ReadinessProbe = ReadinessProbe()
    restart: RestartPolicy | None = None


class WorkerGroup(Strict):
    """A named group of identical workers."""

    role: Literal["agg", "prefill", "decode"] = "agg"
    replicas: int = Field(1, ge=0, strict=True)  # strict: "1e3" or "true" from --set is a mistake
    gpus: int | list[int] = Field(
        1, description="GPUs per replica, or explicit GPU ids split evenly across replicas."
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Engine flags: `max-num-seqs: 8` becomes `--max-num-seqs 8`.")
    command: list[str] | None = Field(
        None,
        description="Run this instead of the backend's engine (any OpenAI-compatible server). "
        "Placeholders: {host} {port} {model} {model_path} {gpus} {replica}.",
    )
    env: dict[str, str] = Field(default_factory=dict)
    port: int | None = Field(None, ge=0, le=65535, description="HTTP port of replica 0; replica i uses port+i.")
    host: str = "127.0.0.1"
    readiness_probe: ReadinessProbe = ReadinessProbe()
    grace_period: Duration | None = Field(None, description="SIGTERM to SIGKILL; the backend's default when unset.")
    restart: RestartPolicy | None = None
    required: bool = Field(True, description="When it fails for good, the whole run stops.")

    @field_validator("gpus")
    @classmethod
    def _gpus_valid(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and value < 0:
            raise ValueError("GPUs per replica cannot be negative")
        if isinstance(value, list):
            if any(g < 0 for g in value):
                raise ValueError("GPU ids cannot be negative")
            dupes = sorted({g for g in value if value.count(g) > 1})
            if dupes:
                raise ValueError(f"GPU id {dupes[0]} is listed twice")
        return value

    @model_validator(mode="after")
    def _ids_split_evenly(self) -> WorkerGroup:
        if isinstance(self.gpus, list) and self.replicas and len(self.gpus) % self.replicas:
            raise ValueError(f"{quantity(len(self.gpus), 'GPU id')} cannot be split evenly "
                             f"across {self.replicas} replicas")
        return self


class PortsSpec(Strict):
    base: int = Field(8100, ge=0, le=65535, description="First port for workers and engine side ports; 0 picks free ports.")


class NodeSpec(Strict):
    address: str
    run: list[str] = Field(description="Components on this node: nats, router, frontend, or worker group names.")


class Profile(Strict):
    """A serving topology."""

    name: str
    model: ModelSpec
    backend: Literal["mocker", "vllm", "sglang", "trtllm"] = "vllm"
    nats: NatsSpec = NatsSpec()
    frontend: FrontendSpec = FrontendSpec()
    router: RouterSpec = RouterSpec()
    workers: dict[str, WorkerGroup] = Field(min_length=1)
    restart: RestartPolicy = RestartPolicy()
    ports: PortsSpec = PortsSpec()
    env: dict[str, str] = Field(default_factory=dict, description="Added to every process's environment.")
    nodes: dict[str, NodeSpec] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("use letters, digits, '-', '_' or '.'")
        return value

    @field_validator("workers")
    @classmethod
    def _worker_names(cls, value: dict[str, WorkerGroup]) -> dict[str, WorkerGroup]:
        for name in value:
            if name in ("nats", "router", "frontend") or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
                raise ValueError(f"worker group name {name!r}: use lower-case letters, digits, '-' or '_', not nats/router/frontend")
        return value

    @field_validator("workers")
    @classmethod
    def _something_serves(cls, value: dict[str, WorkerGroup]) -> dict[str, WorkerGroup]:
        serving = [n for n, g in value.items() if g.role in ("agg", "decode")]
        if not any(value[n].replicas for n in serving):
            if serving:
                raise ValueError(f"no worker can answer requests: {', '.join(serving)} "
                                 f"{'has' if len(serving) == 1 else 'have'} replicas: 0")
            raise ValueError("no worker can answer requests: prefill workers need a group with role decode")
        return value

    @field_validator("nodes")
    @classmethod
    def _nodes_cover_components(cls, value: dict[str, NodeSpec], info: ValidationInfo) -> dict[str, NodeSpec]:
        # a field validator (not a model one) so that its errors point at nodes:, not at the whole file
        workers, nats = info.data.get("workers"), info.data.get("nats")
        if not value or workers is None or nats is None:
            return value  # no nodes, or workers/nats were invalid (reported on their own)
        known = {"nats", "router", "frontend", *workers}
        placed: dict[str, str] = {}
        for node_name, node in value.items():
            for component in node.run:
                if component not in known:
                    hint = _nearest(component, known)
                    raise ValueError(f"node {node_name!r} runs unknown component {component!r}{hint}")
                if component in placed:
                    raise ValueError(f"{component!r} is placed on both {placed[component]!r} and {node_name!r}")
                placed[component] = node_name
        missing = sorted(known - set(placed) - ({"nats"} if not nats.embedded else set()) - {"router"})
        if missing:
            raise ValueError(f"nodes do not place: {', '.join(missing)}")
        return value

    def restart_for(self, override: RestartPolicy | None) -> RestartPolicy:
        return override or self.restart


# --------------------------------------------------------------------------- loading


@dataclass
class SourceMap:
    """Where each key path came from: a file position or a ``--set`` flag."""

    file: str
    positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    value_positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    overrides: set[tuple] = field(default_factory=set)
    flags: dict[tuple, str] = field(default_factory=dict)  # paths set by a flag other than --set: "--backend"

    def path_of(self, dotted: str) -> tuple:
        """The key path a dotted name means: ``workers.w.args.compilation-config.level`` is
        ``(..., "args", "compilation-config.level")`` when the profile wrote that key with its dot."""
        best, longest = tuple(dotted.split(".")), -1
        for path in self.positions.keys() | self.overrides:
            if not any("." in str(key) for key in path):
                continue  # split on dots it is already the plain reading
            joined = ".".join(map(str, path))
            if (dotted == joined or dotted.startswith(joined + ".")) and len(joined) > longest:
                best, longest = path, len(joined)
        return best

    def where(self, path: tuple, value: bool = False) -> str:
        """``file:line:col`` of a key (or of its value), or the ``--set`` flag that set it."""
        probe = tuple(path)
        if probe and probe not in self.positions:  # a key only a --set made (a misspelt section, say)
            made = sorted(o for o in self.overrides if o[:len(probe)] == probe)
            if made:
                return f"--set {'.'.join(map(str, made[0]))}"
        while True:
            if probe in self.flags:
                return self.flags[probe]
            if probe in self.overrides:
                return f"--set {'.'.join(map(str, probe))}"
            table = self.value_positions if value and probe == tuple(path) and probe in self.value_positions else self.positions
            if probe in table:
                line, col = table[probe]
                return f"{self.file}:{line + 1}:{col + 1}"
            if not probe:
                return self.file
            probe = probe[:-1]


@dataclass
class LoadedProfile:
    profile: Profile
    path: Path | None
    sources: SourceMap


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; ``$$`` is a literal ``$``.

    Raises KeyError(VAR) for an undefined variable without a default.
    """

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None and ":-" in match.group(0)):
            if default is None:
                raise KeyError(name)
            return default
        return value

    return _VAR.sub(replace, text)


def _walk_positions(node: Any, path: tuple, sources: SourceMap) -> None:
    if isinstance(node, CommentedMap):
        for key in node:
            here = path + (str(key),)
            try:
                sources.positions[here] = tuple(node.lc.key(key))
                sources.value_positions[here] = tuple(node.lc.value(key))
            except (KeyError, TypeError):
                sources.positions[here] = (node.lc.line, node.lc.col)
            _walk_positions(node[key], here, sources)
    elif isinstance(node, CommentedSeq):
        for index, item in enumerate(node):
            try:
                sources.positions[path + (index,)] = tuple(node.lc.item(index))
            except (KeyError, TypeError):
                sources.positions[path + (index,)] = (node.lc.line, node.lc.col)
            _walk_positions(item, path + (index,), sources)


def expand_text(text: str, env: Mapping[str, str], filename: str) -> str:
    """Expand variables in the profile text before parsing, so ``port: ${PORT:-8000}`` is an int.

    Working on text (as process-compose does) keeps line numbers and lets a variable sit
    inside a flow mapping. Whole-line comments are left alone.
    """
    problems: list[str] = []
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        if "$" not in line or line.lstrip().startswith("#"):
            continue
        try:
            lines[number] = expand_vars(line, env)
        except KeyError as exc:
            name = exc.args[0]
            column = line.find("${" + name) + 1
            problems.append(
                f"{filename}:{number + 1}:{column}: ${{{name}}} is not set; "
                f"export {name}=... or write ${{{name}:-default}}"
            )
    if problems:
        raise ProfileError(problems)
    return "".join(lines)


def _plain(node: Any) -> Any:
    """Convert ruamel nodes to plain Python containers."""
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


def _scalar(text: str) -> Any:
    """Parse a value the way YAML would: ``8`` is an int, ``true`` a bool, ``[0,1]`` a list."""
    try:
        return YAML(typ="safe").load(text) if text.strip() else text
    except Exception:
        return text


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _nearest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


_NAMED_SECTIONS = {"workers": ("worker group", "groups"), "nodes": ("node", "nodes")}


def apply_override(data: dict, assignment: str, sources: SourceMap, env: Mapping[str, str] | None = None) -> None:
    """Apply one ``key.path=value`` to the plain profile data; ``${VAR}`` in the value is expanded
    from ``env`` as in the profile's text (so a single-quoted ``'${KEY}'`` is the variable, not the
    literal string)."""
    if "=" not in assignment:
        raise ProfileError([f"--set {assignment}: expected key.path=value, for example --set frontend.port=8080"])
    key, _, raw = assignment.partition("=")
    if "$" in raw:
        try:
            raw = expand_vars(raw, os.environ if env is None else env)
        except KeyError as exc:
            name = exc.args[0]
            raise ProfileError([f"--set {key}: ${{{name}}} is not set; export {name}=..., write "
                                f"${{{name}:-default}}, or $${{{name}}} for a literal ${{{name}}}"]) from None
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ProfileError([f"--set {assignment}: empty key in {key!r}"])
    named = data.get(parts[0])  # a misspelt worker group or node would silently become a new one
    if parts[0] in _NAMED_SECTIONS and len(parts) > 2 and isinstance(named, dict) and parts[1] not in named:
        what, plural = _NAMED_SECTIONS[parts[0]]
        raise ProfileError([f"--set {key}: the profile has no {what} {parts[1]!r}"
                            f"{_nearest(parts[1], named)} ({plural}: {', '.join(named) or 'none'})"])
    target = data
    for part in parts[:-1]:
        existing = target.get(part)
        if part == "nats" and isinstance(existing, str):
            existing = {} if existing == "embedded" else {"url": existing}
        if existing is None:
            existing = {}
        if not isinstance(existing, dict):
            raise ProfileError([f"--set {assignment}: {part!r} holds a value, not a section"])
        target[part] = existing
        target = existing
    target[parts[-1]] = _scalar(raw)
    sources.overrides.add(tuple(parts))


def resolve_profile_path(name_or_path: str | os.PathLike) -> Path:
    """A file path, or the name of a shipped profile (``agg`` → profiles/agg.yaml)."""
    path = Path(name_or_path)
    # Not is_file(): a pipe (``dynamo serve <(envsubst < p.yaml)``) is a fine profile; a directory is not.
    if path.exists() and not path.is_dir():
        return path
    shipped = SHIPPED_PROFILES_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if path.parent == Path(".") and shipped.exists():
        return shipped
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise ProfileError([f"{name_or_path}: is a directory, not a profile file; give a YAML file{hint}"])
    choices = sorted(p.stem for p in SHIPPED_PROFILES_DIR.glob("*.yaml")) if SHIPPED_PROFILES_DIR.exists() else []
    hint = f" Shipped profiles: {', '.join(choices)}." if choices else ""
    raise ProfileError([f"{name_or_path}: no such file.{hint}"])


def load_profile(
    source: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
) -> LoadedProfile:
    """Read, expand, override and validate a profile; raise ProfileError listing every problem."""
    path = resolve_profile_path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError([f"{path}: not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                            "a profile is YAML text"]) from None
    except OSError as exc:
        raise ProfileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse_profile(text, str(path), overrides=overrides, env=env, backend=backend, path=path)


def parse_profile(
    text: str,
    filename: str = "<profile>",
    overrides: list[str] | tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    backend: str | None = None,
    path: Path | None = None,
) -> LoadedProfile:
    env = os.environ if env is None else env
    sources = SourceMap(filename)
    text = expand_text(text, env, filename)
    try:
        tree = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        problem = exc.problem or exc.context or "invalid YAML"
        raise ProfileError([f"{where}: malformed YAML: {problem}"]) from None
    except Exception as exc:  # ruamel raises a few unmarked errors (duplicate keys, bad tokens)
        raise ProfileError([f"{filename}: malformed YAML: {exc}"]) from None
    if not isinstance(tree, Mapping):
        raise ProfileError([f"{filename}:1:1: a profile is a YAML mapping (name:, model:, workers: ...), got {_kind_of(_plain(tree))}"])
    _walk_positions(tree, (), sources)
    data = _plain(tree)
    for assignment in overrides:
        apply_override(data, assignment, sources, env)
    if backend:
        if backend not in BACKENDS:
            raise ProfileError([f"--backend {backend}: expected one of {', '.join(BACKENDS)}{_nearest(backend, BACKENDS)}"])
        data["backend"] = backend
        sources.overrides.add(("backend",))
        sources.flags[("backend",)] = f"--backend {backend}"
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_describe(exc, data, sources)) from None
    return LoadedProfile(profile=profile, path=path, sources=sources)


# --------------------------------------------------------------------------- error rendering


def _data_path(loc: tuple, data: Any) -> tuple:
    """Keep the parts of a pydantic error location that exist in the data (drop union tags)."""
    path: list = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and not part.startswith(("function-", "int", "list", "str")):
            path.append(part)
            node = None
    return tuple(path)


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path``."""
    current: Any = Profile
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(part)
            if info is None:
                return None
            current = info.annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, getattr(__import__("types"), "UnionType", Union)):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel) or typing.get_origin(inner) is dict:
                return inner
    return annotation


def _describe(exc: ValidationError, data: dict, sources: SourceMap) -> list[str]:
    problems: list[str] = []
    seen: set[tuple] = set()
    for error in exc.errors():
        path = _data_path(error["loc"], data)
        kind = error["type"]
        # an empty value has no position of its own (ruamel gives the next line's): point at its key
        where = sources.where(path, value=kind not in ("extra_forbidden", "missing") and error.get("input") is not None)
        if kind == "extra_forbidden":
            model = _model_at(path[:-1])
            hint = _nearest(str(path[-1]), model.model_fields) if model else ""
            allowed = f" (allowed: {', '.join(model.model_fields)})" if model and not hint else ""
            message = f"unknown key{hint}{allowed}"
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("dict_type", "model_type", "model_attributes_type"):
            message = f"expected a mapping (key: value), got {_kind_of(error.get('input'))}"
        elif kind == "too_short" and isinstance(error.get("input"), (dict, list)):
            message = "needs at least one entry"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error and not isinstance(error["input"], (dict, list)) and kind not in ("value_error",):
                message += f" (got {error['input']!r})"
        if kind == "value_error":  # a rule across keys (workers, nodes): blame the one --set under it, if one
            under = [o for o in sources.overrides if len(o) > len(path) and o[:len(path)] == path]
            if len(under) == 1:
                where = f"--set {'.'.join(map(str, under[0]))}"
        key = (path, message)
        if key in seen:
            continue
        seen.add(key)
        named = where == f"--set {_dotted(path)}"  # the flag already names the key
        problems.append(f"{where}: {message}" if named else f"{where}: {_dotted(path)}: {message}")
    return problems


def _kind_of(value: Any) -> str:
    """How a YAML value reads to its author."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f"the text {value!r}" if isinstance(value, str) else type(value).__name__


def profile_json_schema() -> dict:
    """The JSON Schema of profiles, as committed in profiles/schema.json."""
    schema = Profile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dynamo profile"
    return schema
