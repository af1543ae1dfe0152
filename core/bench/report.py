"""Rendering and files: the live progress line, final tables, results.json, summary.csv and
per-request JSONL. Nothing here measures; it only shows what the runner collected."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import msgspec
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dynamo.core.bench.metrics import PERCENTILES, request_metrics
from dynamo.core.bench.runner import BenchResult, LiveStats, PointResult
from dynamo.core.text import quantity

__all__ = ["DIST_METRICS", "LiveDisplay", "result_to_dict", "point_table", "sweep_tables", "write_outputs",
           "load_results", "RESULTS_FILE"]

RESULTS_FILE = "results.json"
RESULTS_VERSION = 1

DIST_METRICS: list[tuple[str, str]] = [
    ("ttft_ms", "TTFT (ms)"),
    ("itl_ms", "ITL per token (ms)"),
    ("icl_ms", "ICL per chunk (ms)"),
    ("tpot_ms", "TPOT (ms)"),
    ("e2el_ms", "E2EL (ms)"),
    ("output_tokens_per_s_per_user", "Output tok/s per user"),
    ("input_tokens", "Input tokens"),
    ("output_tokens", "Output tokens"),
    ("schedule_lag_ms", "Schedule lag (ms)"),
    ("client_loop_lag_ms", "Client loop lag (ms)"),
]
STATS = ["mean", *[f"p{p}" for p in PERCENTILES], "min", "max"]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


class LiveDisplay:
    """A progress display on stderr, refreshed from the event loop (rich's own refresh thread is off)."""

    def __init__(self, stats: LiveStats, console: Console | None = None, enabled: bool = True):
        self.stats = stats
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self._samples: deque[tuple[float, int, int]] = deque()
        self._live: Live | None = None
        self._task: asyncio.Task | None = None

    def renderable(self) -> Group:
        s = self.stats
        now = time.perf_counter()
        elapsed = now - s.started
        self._samples.append((now, s.completed + s.failed, s.output_tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()
        t_old, n_old, tok_old = self._samples[0]
        window = now - t_old
        req_rate = (s.completed + s.failed - n_old) / window if window > 0.2 else 0.0
        tok_rate = (s.output_tokens - tok_old) / window if window > 0.2 else 0.0
        done = s.completed + s.failed
        if s.target:
            total, completed = float(s.target), float(done)
        elif s.duration:
            total, completed = s.duration, min(elapsed, s.duration)
        else:
            total, completed = 1.0, 0.0
        head = Text.assemble((f"{s.label or 'bench'} ", "bold"), (s.phase, "cyan"))
        line = Text(
            f"done {done}" + (f"/{s.target}" if s.target else "")
            + f"  in flight {s.in_flight}  failed {s.failed}  "
            f"{req_rate:.1f} req/s  {tok_rate:,.0f} out tok/s (last 5 s)  {elapsed:.1f}s"
        )
        if s.failed:
            line.stylize("yellow")
        return Group(head, ProgressBar(total=total, completed=completed, width=50), line)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self._live is not None:
                self._live.update(self.renderable(), refresh=True)

    async def __aenter__(self) -> "LiveDisplay":
        if self.enabled:
            self._live = Live(self.renderable(), console=self.console, auto_refresh=False, transient=True)
            self._live.start()
            self._task = asyncio.create_task(self._refresh())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._live is not None:
            self._live.stop()

    def point_done(self, result: PointResult) -> None:
        """One line per finished point, kept above the live display."""
        s = result.summary
        msg = (f"{result.point.label}: {s['completed']} ok, {s['failed']} failed, "
               f"{s['request_throughput']:.2f} req/s, {s['output_token_throughput']:,.0f} out tok/s, "
               f"TTFT p50 {_fmt((s['ttft_ms'] or {}).get('p50'))} ms, ITL p50 {_fmt((s['itl_ms'] or {}).get('p50'))} ms")
        if self.enabled or not self.console.is_terminal:
            self.console.print(msg, highlight=False)


def result_to_dict(result: BenchResult, config: dict) -> dict:
    """The JSON document of a run (results.json and ``--json``)."""
    return {
        "version": RESULTS_VERSION,
        "tool": "dynamo bench",
        "config": config,
        "server": {"model": result.server.model, "models": result.server.models,
                   "continuous_usage": result.server.continuous_usage},
        "points": [{"point": p.point.describe(), "summary": p.summary} for p in result.points],
    }


def _headline(s: dict) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    tok = s["tokens"]
    sent = s["requests"] + s["cancelled"]
    outcome = f"{s['completed']} ok, {s['failed']} failed" + (f", {s['cancelled']} cancelled" if s["cancelled"] else "")
    if sent and not s["completed"]:
        outcome += " (every request failed)" if s["failed"] == sent else " (none succeeded)"
    rows = [
        ("Requests", f"{sent} sent: {outcome}"),
        ("Duration", f"{s['duration_s']:.2f} s"),
        ("Request throughput", f"{s['request_throughput']:.2f} req/s"),
        ("Output token throughput", f"{s['output_token_throughput']:,.1f} tok/s"),
        ("Total token throughput", f"{s['total_token_throughput']:,.1f} tok/s"),
        ("Concurrency (mean / peak)", f"{s['mean_concurrency']:.2f} / {s['peak_concurrency']}"),
    ]
    if s.get("goodput") is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in (s.get("goodput_slos_ms") or {}).items())
        rows.append(("Goodput", f"{s['goodput']:.2f} req/s ({100 * s['goodput_fraction']:.1f}% of requests meet {slos} ms)"))
    if s["completed"]:  # token counts are over successful requests: none, nothing to count
        rows.append(("Input tokens client / server", f"{_fmt(tok['input_client'])} / {_fmt(tok['input_server'])}"
                     + (f" (diff {tok['input_difference']:+d}, {tok['input_difference_pct']:+.2f}%)"
                        if tok["input_difference"] is not None and tok["input_difference_pct"] is not None else "")))
        rows.append(("Output tokens client / server", f"{_fmt(tok['output_client'])} / {_fmt(tok['output_server'])}"
                     + (f" (diff {tok['output_difference']:+d}, {tok['output_difference_pct']:+.2f}%)"
                        if tok["output_difference"] is not None and tok["output_difference_pct"] is not None else "")
                     + f"; requested {tok['output_requested']}"))
    sources = tok.get("chunk_token_source")
    if sources and s.get("itl_ms"):
        rows.append(("Tokens per chunk from", ", ".join(f"{k} ({quantity(v, 'request')})"
                                                         for k, v in sorted(sources.items()))))
    if tok["short_outputs"]:
        short = tok["short_outputs"]
        rows.append(("Short outputs", f"{quantity(short, 'request')} got fewer tokens than asked"))
    if s["errors"]:
        rows.append(("Errors", ", ".join(f"{k} {v}" for k, v in s["errors"].items())))
    for w in s.get("warnings") or []:
        rows.append(("[yellow]Warning[/]", w))
    if s.get("interrupted"):
        rows.append(("[yellow]Interrupted[/]", "this load point was cut short: its numbers cover the requests that "
                     "finished before the signal"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def point_table(result: PointResult | dict, title: str | None = None) -> Group:
    """The final table of one load point: headline numbers and every distribution."""
    if isinstance(result, PointResult):
        label, s = result.point.label, result.summary
    else:
        label, s = result["point"]["label"], result["summary"]
    if title is None:
        title = f"dynamo bench: {label}" + (" (interrupted: partial)" if s.get("interrupted") else "")
    dist = Table(title=title, title_justify="left")
    dist.add_column("Metric")
    for stat in STATS:
        _number_column(dist, stat)
    for key, name in DIST_METRICS:
        d = s.get(key)
        if not d:
            continue
        digits = 0 if key in ("input_tokens", "output_tokens") else 2
        dist.add_row(name, *[_fmt(d.get(stat), digits) for stat in STATS])
    if not dist.row_count:  # every request failed: no distribution to show
        return Group(Text(title, style="italic"), _headline(s))
    return Group(dist, _headline(s))


# Two tables of at most 7 columns: one table of 13 does not fit an 80-column terminal.
SWEEP_THROUGHPUT: list[tuple[str, str, str | None]] = [
    ("Req/s", "request_throughput", None),
    ("Out tok/s", "output_token_throughput", None),
    ("Tok/s/user p50", "output_tokens_per_s_per_user", "p50"),
    ("Goodput", "goodput", None),
]
SWEEP_LATENCY: list[tuple[str, str, str | None]] = [
    ("TTFT p50", "ttft_ms", "p50"),
    ("TTFT p99", "ttft_ms", "p99"),
    ("ITL p50", "itl_ms", "p50"),
    ("ITL p99", "itl_ms", "p99"),
    ("TPOT p50", "tpot_ms", "p50"),
    ("E2EL p50", "e2el_ms", "p50"),
]


def _number_column(table: Table, header: str) -> None:
    """A right-aligned column whose numbers are never cut: the table wraps its text columns first,
    and a number too wide for any layout folds onto a second line rather than losing digits."""
    table.add_column(header, justify="right", no_wrap=True, overflow="fold")


def summary_value(s: dict, key: str, stat: str | None) -> float | None:
    v = s.get(key)
    if stat is None:
        return v if isinstance(v, (int, float)) else None
    return (v or {}).get(stat)


def sweep_tables(points: Iterable[dict]) -> list[Table]:
    """One row per load point, in two tables that each fit 80 columns: throughput, then latency (ms).
    A point cut short by a signal is marked ``*``."""
    points = list(points)
    throughput = Table(title="dynamo bench sweep: throughput", title_justify="left")
    latency = Table(title="dynamo bench sweep: latency (ms)", title_justify="left")
    for table in (throughput, latency):
        table.add_column("Load")
    for header in ("OK", "Err", *(name for name, _, _ in SWEEP_THROUGHPUT)):
        _number_column(throughput, header)
    for name, _, _ in SWEEP_LATENCY:
        _number_column(latency, name)
    for p in points:
        s = p["summary"]
        label = p["point"]["label"] + ("*" if s.get("interrupted") else "")
        throughput.add_row(label, str(s["completed"]), str(s["failed"]),
                           *[_fmt(summary_value(s, key, stat)) for _, key, stat in SWEEP_THROUGHPUT])
        latency.add_row(label, *[_fmt(summary_value(s, key, stat)) for _, key, stat in SWEEP_LATENCY])
    if any(p["summary"].get("interrupted") for p in points):
        for table in (throughput, latency):
            table.caption, table.caption_justify = "* interrupted: partial results", "left"
    return [throughput, latency]


def _csv_row(p: dict) -> dict:
    s = p["summary"]
    row: dict[str, Any] = {"label": p["point"]["label"], "concurrency": p["point"]["concurrency"],
                           "request_rate": p["point"]["request_rate"], "burstiness": p["point"]["burstiness"]}
    for k in ("requests", "completed", "failed", "cancelled", "duration_s", "request_throughput",
              "output_token_throughput", "total_token_throughput", "goodput", "goodput_fraction",
              "mean_concurrency", "peak_concurrency", "interrupted"):
        row[k] = s.get(k)
    for key, _ in DIST_METRICS:
        d = s.get(key) or {}
        for stat in ("mean", "std", *[f"p{q}" for q in PERCENTILES], "min", "max"):
            row[f"{key}_{stat}"] = d.get(stat)
    for k, v in s["tokens"].items():
        if not isinstance(v, dict):
            row[f"tokens_{k}"] = v
    row["errors"] = json.dumps(s["errors"]) if s["errors"] else ""
    return row


def _request_line(r, enc: msgspec.json.Encoder) -> bytes:
    m = request_metrics(r) if r.ok else {}
    doc = {
        "index": r.index, "session": r.session, "turn": r.turn, "ok": r.ok, "error": r.error,
        "error_detail": r.error_detail, "status": r.status,
        "scheduled_s": r.scheduled, "sent_s": r.sent,
        "ttft_ms": None if r.ttft is None else r.ttft * 1000,
        "e2el_ms": None if r.e2el is None else r.e2el * 1000,
        "tpot_ms": m.get("tpot_ms"),
        "input_tokens_client": r.input_tokens_client, "input_tokens_server": r.input_tokens_server,
        "output_tokens_client": r.output_tokens_client, "output_tokens_server": r.output_tokens_server,
        "output_tokens_requested": r.requested_output_tokens, "finish_reason": r.finish_reason,
        "chunk_tokens_source": r.tokens_source,
        "chunk_offsets_ms": [round(x * 1000, 4) for x in r.chunk_offsets],
        "chunk_tokens": r.chunk_tokens,
    }
    return enc.encode(doc) + b"\n"


def write_outputs(out_dir: Path, doc: dict, result: BenchResult, save_requests: bool = True) -> list[Path]:
    """results.json, summary.csv and requests-<label>.jsonl under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    tmp = out_dir / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out_dir / RESULTS_FILE)
    paths.append(out_dir / RESULTS_FILE)
    rows = [_csv_row(p) for p in doc["points"]]
    csv_path = out_dir / "summary.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["label"])
        writer.writeheader()
        writer.writerows(rows)
    paths.append(csv_path)
    if save_requests:
        enc = msgspec.json.Encoder()
        for p in result.points:
            path = out_dir / f"requests-{p.point.label}.jsonl"
            with open(path, "wb") as f:
                for r in p.records:
                    f.write(_request_line(r, enc))
            paths.append(path)
    return paths


def load_results(path: Path) -> dict:
    """A results.json (or a directory holding one), checked enough to compare."""
    from dynamo.core.errors import UsageError

    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {p}: {exc.strerror} (expected a dynamo bench --output-dir)") from None
    except ValueError as exc:
        raise UsageError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise UsageError(f"{p} is not a dynamo bench results file")
    return doc
