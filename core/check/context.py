"""What every section of `dynamo check` may need, computed once and shared between threads.

Sections run concurrently; the NVML inventory and the profile's plan are each computed by
the first section that asks for them, under a lock, and reused by the others.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamo.core.errors import UsageError

if TYPE_CHECKING:
    from dynamo.core.gpus import GpuInventory
    from dynamo.core.plan import Plan
    from dynamo.core.profile import LoadedProfile


@dataclass(frozen=True)
class CheckOptions:
    """What the user asked `dynamo check` to look at."""

    profile: str | None = None
    overrides: tuple[str, ...] = ()
    backend: str | None = None
    assume_gpus: int | None = None
    node: str | None = None
    url: str | None = None
    run: str | None = None
    api_key: str | None = None  # sent to the endpoint as a bearer token (--api-key / $DYNAMO_API_KEY)
    home: Path | None = None  # $DYNAMO_HOME; None means the default
    # Seconds from the `dynamo` process's start to the check command: what importing dynamo
    # costs a user, measured for free. Without it the software section times the import in a child.
    cli_startup: float | None = None


@dataclass
class ProfileState:
    """The profile and its plan on this machine, or why there is none."""

    loaded: LoadedProfile | None = None
    problems: list[str] = field(default_factory=list)  # profile validation problems
    uses_gpus: bool = False
    gpus_needed: int = 0
    backend_error: str | None = None  # the backend cannot be launched by this version
    plan: Plan | None = None
    plan_error: str | None = None  # a PlanError other than too few GPUs
    gpu_error: str | None = None  # too few GPUs for the plan
    planned_with_assumed: bool = False  # plan built with an assumed inventory to check the rest

    @property
    def valid(self) -> bool:
        return self.loaded is not None

    @property
    def disaggregated(self) -> bool:
        if self.loaded is None:
            return False
        return any(g.role in ("prefill", "decode") and g.replicas for g in self.loaded.profile.workers.values())


def assumed_gpus_from_env() -> int | None:
    """$DYNAMO_ASSUME_GPUS as a number; a UsageError (exit 2) when it is not one."""
    from dynamo.core.gpus import ASSUME_ENV

    raw = os.environ.get(ASSUME_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{ASSUME_ENV}={raw!r}: expected a number of GPUs") from None
    if value < 0:
        raise UsageError(f"{ASSUME_ENV}={raw!r}: expected a number of GPUs (0 or more)")
    return value


class CheckContext:
    def __init__(self, options: CheckOptions):
        self.options = options
        self.assume_gpus = options.assume_gpus if options.assume_gpus is not None else assumed_gpus_from_env()
        self._lock = threading.Lock()
        self._nvml: GpuInventory | None = None
        self._profile: ProfileState | None = None
        self._profile_lock = threading.Lock()
        # The runner sets both; sections bound their waits by the deadline (time.monotonic()).
        self.started = time.monotonic()
        self.deadline = self.started + 2.0

    # ------------------------------------------------------------------ GPUs

    def nvml(self) -> GpuInventory:
        """What NVML reports on this machine (never the assumed inventory)."""
        with self._lock:
            if self._nvml is None:
                from dynamo.core.gpus import nvml_inventory

                self._nvml = nvml_inventory()
            return self._nvml

    def planning_inventory(self) -> GpuInventory:
        """The inventory the profile is planned with: --assume-gpus / $DYNAMO_ASSUME_GPUS, else NVML."""
        if self.assume_gpus is not None:
            from dynamo.core.gpus import assumed_inventory

            return assumed_inventory(self.assume_gpus)
        return self.nvml()

    # ------------------------------------------------------------------ profile

    def home(self) -> Path:
        from dynamo.core.rundir import dynamo_home

        return self.options.home or dynamo_home()

    def profile(self) -> ProfileState | None:
        """The profile loaded and planned (once), or None when no profile was given."""
        if self.options.profile is None:
            return None
        with self._profile_lock:
            if self._profile is None:
                self._profile = self._load_and_plan()
            return self._profile

    def _load_and_plan(self) -> ProfileState:
        from dynamo.core.errors import PlanError, ProfileError
        from dynamo.core.profile import load_profile, resolve_profile_path

        opts = self.options
        try:
            resolve_profile_path(opts.profile)
        except ProfileError as exc:
            raise UsageError(str(exc)) from None  # no such file: the user mistyped the argument
        state = ProfileState()
        try:
            state.loaded = load_profile(opts.profile, list(opts.overrides), backend=opts.backend)
        except ProfileError as exc:
            state.problems = list(exc.problems)
            return state
        profile = state.loaded.profile
        try:
            from dynamo.backends import get_backend

            backend = get_backend(profile.backend)
        except PlanError as exc:
            state.backend_error = str(exc)
            return state
        state.uses_gpus = backend.uses_gpus
        if backend.uses_gpus:
            state.gpus_needed = gpus_needed(profile, opts.node)
        state.plan, error = _try_plan(state.loaded, self.planning_inventory(), opts.node)
        if error is None:
            return state
        if backend.uses_gpus:
            # Plan again as if the GPUs were there: when that works, the first failure was about
            # GPUs, and the plan still lets the other checks (ports, executables) run.
            from dynamo.core.gpus import assumed_inventory

            state.plan, second = _try_plan(state.loaded, assumed_inventory(max_gpu_id(profile) + 1), opts.node)
            if state.plan is not None:
                state.gpu_error = error
                state.planned_with_assumed = True
                return state
            error = second
        state.plan_error = error
        return state


def _try_plan(loaded: Any, inventory: Any, node: str | None) -> tuple[Any, str | None]:
    from dynamo.core.errors import PlanError
    from dynamo.core.plan import build_plan

    try:
        return build_plan(loaded, inventory, node=node), None
    except PlanError as exc:
        return None, str(exc)


def gpus_needed(profile: Any, node: str | None = None) -> int:
    """GPUs the profile's workers need (on ``node`` when given and the profile has nodes)."""
    total = 0
    for name, group in profile.workers.items():
        if not group.replicas:
            continue
        if node is not None and profile.nodes and not any(name in n.run for k, n in profile.nodes.items() if k == node):
            continue
        total += len(group.gpus) if isinstance(group.gpus, list) else group.gpus * group.replicas
    return total


def max_gpu_id(profile: Any) -> int:
    """The highest GPU id an assumed inventory must have to plan this profile: count or explicit ids."""
    highest = gpus_needed(profile) - 1
    for group in profile.workers.values():
        if isinstance(group.gpus, list) and group.gpus:
            highest = max(highest, max(group.gpus))
    return highest
