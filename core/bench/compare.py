"""Two benchmark results side by side, with the ratio B/A for every headline metric."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from dynamo.core.bench.report import load_results, summary_value

__all__ = ["COMPARE_METRICS", "compare_results", "compare_tables"]

# (name, summary key, stat or None, True when higher is better)
COMPARE_METRICS: list[tuple[str, str, str | None, bool]] = [
    ("Completed", "completed", None, True),
    ("Failed", "failed", None, False),
    ("Request throughput (req/s)", "request_throughput", None, True),
    ("Output tok/s", "output_token_throughput", None, True),
    ("Total tok/s", "total_token_throughput", None, True),
    ("Goodput (req/s)", "goodput", None, True),
    ("Output tok/s per user p50", "output_tokens_per_s_per_user", "p50", True),
    ("TTFT mean (ms)", "ttft_ms", "mean", False),
    ("TTFT p50 (ms)", "ttft_ms", "p50", False),
    ("TTFT p99 (ms)", "ttft_ms", "p99", False),
    ("ITL p50 (ms)", "itl_ms", "p50", False),
    ("ITL p99 (ms)", "itl_ms", "p99", False),
    ("TPOT p50 (ms)", "tpot_ms", "p50", False),
    ("TPOT p99 (ms)", "tpot_ms", "p99", False),
    ("E2EL p50 (ms)", "e2el_ms", "p50", False),
    ("E2EL p99 (ms)", "e2el_ms", "p99", False),
]


def _pairs(a: dict, b: dict) -> list[tuple[str, dict | None, dict | None]]:
    """Points matched by label (c8 with c8); points only one side has are shown alone."""
    by_b = {p["point"]["label"]: p for p in b["points"]}
    labels_a = [p["point"]["label"] for p in a["points"]]
    if len(a["points"]) == 1 and len(b["points"]) == 1 and labels_a[0] not in by_b:
        pa, pb = a["points"][0], b["points"][0]
        return [(f"{pa['point']['label']} vs {pb['point']['label']}", pa, pb)]
    out: list[tuple[str, dict | None, dict | None]] = []
    for p in a["points"]:
        out.append((p["point"]["label"], p, by_b.get(p["point"]["label"])))
    for p in b["points"]:
        if p["point"]["label"] not in labels_a:
            out.append((p["point"]["label"], None, p))
    return out


def compare_results(dir_a: Path, dir_b: Path) -> dict:
    """The comparison as data: one entry per load point with A, B and B/A per metric, and which sides
    of it (``"A"``, ``"B"``) were cut short by an interrupted benchmark, so cover only part of the load."""
    a, b = load_results(dir_a), load_results(dir_b)
    points = []
    for label, pa, pb in _pairs(a, b):
        rows = []
        for name, key, stat, higher in COMPARE_METRICS:
            va = summary_value(pa["summary"], key, stat) if pa else None
            vb = summary_value(pb["summary"], key, stat) if pb else None
            ratio = vb / va if (va not in (None, 0) and vb is not None) else None
            rows.append({"metric": name, "key": key, "stat": stat, "a": va, "b": vb, "ratio": ratio,
                         "higher_is_better": higher})
        cut = [side for side, point in (("A", pa), ("B", pb)) if point and point["summary"].get("interrupted")]
        points.append({"label": label, "metrics": rows, "interrupted": cut})
    return {"a": str(dir_a), "b": str(dir_b),
            "model_a": a.get("server", {}).get("model"), "model_b": b.get("server", {}).get("model"),
            "points": points}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}"


def compare_tables(data: dict) -> list[Table]:
    """One rich table per load point; ratios are green when B is better, red when worse (>2%)."""
    tables = []
    for p in data["points"]:
        cut = p.get("interrupted") or []
        partial = f" ({' and '.join(cut)} interrupted: partial)" if cut else ""
        t = Table(title=f"{p['label']}{partial}: A = {data['a']}  B = {data['b']}", title_justify="left")
        t.add_column("Metric")
        t.add_column("A", justify="right")
        t.add_column("B", justify="right")
        t.add_column("B/A", justify="right")
        for row in p["metrics"]:
            ratio = row["ratio"]
            text = "-" if ratio is None else f"{ratio:.3f}"
            style = ""
            if ratio is not None and abs(ratio - 1) > 0.02:
                better = (ratio > 1) == row["higher_is_better"]
                style = "green" if better else "red"
            t.add_row(row["metric"], _fmt(row["a"]), _fmt(row["b"]), f"[{style}]{text}[/]" if style else text)
        tables.append(t)
    return tables
