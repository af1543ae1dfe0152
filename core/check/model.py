"""What `dynamo check` reports: one result per checked thing, grouped by section.

The core returns these as data; the CLI renders them (rich text or ``--json``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "warn", "error", "info"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "error", "info")

SECTIONS: dict[str, str] = {
    "system": "System",
    "gpus": "GPUs",
    "software": "Software",
    "profile": "Profile",
    "live": "Live run",
}


@dataclass
class CheckResult:
    """One checked thing: what it is, how it stands, and how to fix it when it is a problem."""

    section: str
    name: str
    status: Status
    message: str
    fix: str | None = None
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section, "name": self.name, "status": self.status, "message": self.message,
            "fix": self.fix, "details": list(self.details), "data": self.data,
        }


class Results:
    """The results of one section, appended as the section goes (kept even if it later times out)."""

    def __init__(self, section: str):
        self.section = section
        self.items: list[CheckResult] = []
        self._lock = threading.Lock()

    # name, status and message are positional-only so that **data may use those words as keys.
    def add(self, name: str, status: Status, message: str, /, fix: str | None = None,
            details: list[str] | None = None, **data: Any) -> CheckResult:
        result = CheckResult(self.section, name, status, message, fix, list(details or []), data)
        with self._lock:
            self.items.append(result)
        return result

    def ok(self, name: str, message: str, /, details: list[str] | None = None, **data: Any) -> CheckResult:
        return self.add(name, "ok", message, None, details, **data)

    def info(self, name: str, message: str, /, fix: str | None = None, details: list[str] | None = None,
             **data: Any) -> CheckResult:
        return self.add(name, "info", message, fix, details, **data)

    def warn(self, name: str, message: str, /, fix: str | None = None, details: list[str] | None = None,
             **data: Any) -> CheckResult:
        return self.add(name, "warn", message, fix, details, **data)

    def error(self, name: str, message: str, /, fix: str | None = None, details: list[str] | None = None,
              **data: Any) -> CheckResult:
        return self.add(name, "error", message, fix, details, **data)

    def snapshot(self) -> list[CheckResult]:
        with self._lock:
            return list(self.items)


@dataclass
class SectionReport:
    name: str
    title: str
    results: list[CheckResult]
    seconds: float
    finished: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "seconds": round(self.seconds, 3),
                "finished": self.finished, "results": [r.to_dict() for r in self.results]}


@dataclass
class CheckReport:
    sections: list[SectionReport]
    seconds: float
    strict: bool = False
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def results(self) -> list[CheckResult]:
        return [r for s in self.sections for r in s.results]

    def counts(self) -> dict[str, int]:
        counts = {status: 0 for status in STATUSES}
        for result in self.results:
            counts[result.status] += 1
        return counts

    @property
    def exit_code(self) -> int:
        """0 without errors, 1 with errors (``--strict`` has already turned warnings into errors)."""
        return 1 if self.counts()["error"] else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == 0, "exit_code": self.exit_code, "strict": self.strict,
            "seconds": round(self.seconds, 3), "summary": self.counts(), "context": self.context,
            "sections": [s.to_dict() for s in self.sections],
        }


def apply_strict(results: list[CheckResult]) -> None:
    """``--strict``: every warning becomes an error (marked so the report can say why)."""
    for result in results:
        if result.status == "warn":
            result.status = "error"
            result.data["strict"] = True
