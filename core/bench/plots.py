"""PNG plots of a sweep (matplotlib, Agg backend: no display needed).

- ``ttft.png``: TTFT p50/p90/p99 vs load
- ``itl.png``: ITL per token p50/p90/p99 (and TPOT p50) vs load
- ``throughput.png``: output tokens/s and requests/s vs load
- ``throughput_per_user.png``: output tokens/s per user (p50) vs total output tokens/s,
  each point labelled with its load: the usual "pareto" view for choosing a deployment
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_plots"]


def _axis(points: list[dict]) -> tuple[list[float], str, list[str]]:
    first = points[0]["point"]
    if first.get("concurrency") is not None:
        return [float(p["point"]["concurrency"]) for p in points], "concurrency", [p["point"]["label"] for p in points]
    xs = []
    for p in points:
        r = p["point"].get("request_rate")
        xs.append(float("nan") if r in (None, "inf") else float(r))
    return xs, "request rate (req/s)", [p["point"]["label"] for p in points]


def _get(points: list[dict], key: str, stat: str | None = None) -> list[float]:
    out = []
    for p in points:
        v = p["summary"].get(key)
        if stat is not None:
            v = (v or {}).get(stat)
        out.append(float("nan") if v is None else float(v))
    return out


def write_plots(out_dir: Path, doc: dict) -> list[Path]:
    """Write the sweep plots for ``doc`` (a results.json document); returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = doc["points"]
    if not points:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    xs, xlabel, labels = _axis(points)
    model = doc.get("server", {}).get("model", "")
    log_x = len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8
    written: list[Path] = []

    def finish(fig, ax, name: str, title: str) -> None:
        ax.set_title(f"{title}\n{model}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def vs_load(name: str, title: str, ylabel: str, series: list[tuple[str, list[float]]]) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for lab, ys in series:
            ax.plot(xs, ys, marker="o", label=lab)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log_x:
            ax.set_xscale("log", base=2)
        finish(fig, ax, name, title)

    vs_load("ttft.png", "Time to first token", "TTFT (ms)",
            [(f"p{q}", _get(points, "ttft_ms", f"p{q}")) for q in (50, 90, 99)])
    vs_load("itl.png", "Inter-token latency (per token)", "ms",
            [(f"ITL p{q}", _get(points, "itl_ms", f"p{q}")) for q in (50, 90, 99)]
            + [("TPOT p50", _get(points, "tpot_ms", "p50"))])

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, _get(points, "output_token_throughput"), marker="o", label="output tok/s", color="tab:blue")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("output tokens/s")
    if log_x:
        ax.set_xscale("log", base=2)
    ax2 = ax.twinx()
    ax2.plot(xs, _get(points, "request_throughput"), marker="s", label="req/s", color="tab:orange")
    ax2.set_ylabel("requests/s")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    ax.set_title(f"Throughput\n{model}", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tx = _get(points, "output_token_throughput")
    ty = _get(points, "output_tokens_per_s_per_user", "p50")
    ax.plot(tx, ty, marker="o", label="p50 per user")
    for x, y, lab in zip(tx, ty, labels):
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("total output tokens/s")
    ax.set_ylabel("output tokens/s per user")
    finish(fig, ax, "throughput_per_user.png", "Throughput per user vs total throughput")
    return written
