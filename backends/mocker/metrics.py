"""Engine metrics under vLLM's Prometheus names.

The hot path (one observation per generated token) only bumps plain Python
attributes and a bucket list; the Prometheus text is rendered on scrape.
The output follows prometheus_client's exposition style (counters are
exposed with their ``_total`` name, every sample carries ``model_name`` and
``engine`` labels).
"""

from __future__ import annotations

import bisect
__all__ = ["Histogram", "EngineMetrics", "TTFT_BUCKETS", "ITL_BUCKETS"]

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
    0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class Histogram:
    """A cumulative-on-render histogram; ``observe`` is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


def _fmt(v: float) -> str:
    return repr(float(v))


class EngineMetrics:
    """Counters and histograms the scheduler updates; gauges are read on scrape."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.computed_prefill_tokens = 0
        self.steps = 0
        self.request_success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue_time = Histogram(LATENCY_BUCKETS)
        self.request_prompt_tokens = Histogram(TOKEN_BUCKETS)
        self.request_generation_tokens = Histogram(TOKEN_BUCKETS)
        self.kv_transfer_seconds = Histogram(ITL_BUCKETS)

    def render(
        self,
        model_name: str,
        gauges: dict[str, tuple[str, float]],
        info: dict[str, str] | None = None,
        counters: dict[str, tuple[str, float]] | None = None,
    ) -> str:
        """Prometheus text exposition; ``gauges`` and ``counters`` map name -> (help, value)."""
        base = f'engine="0",model_name={_label(model_name)}'
        lines: list[str] = []

        def gauge(name: str, help_: str, value: float) -> None:
            lines.append(f"# HELP {name} {help_}\n# TYPE {name} gauge\n{name}{{{base}}} {_fmt(value)}")

        def counter(name: str, help_: str, value: float) -> None:
            lines.append(f"# HELP {name} {help_}\n# TYPE {name} counter\n{name}{{{base}}} {_fmt(value)}")

        def histogram(name: str, help_: str, h: Histogram) -> None:
            out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            cum = 0
            for bound, c in zip(h.bounds, h.counts):
                cum += c
                out.append(f'{name}_bucket{{{base},le="{float(bound)!r}"}} {_fmt(cum)}')
            out.append(f'{name}_bucket{{{base},le="+Inf"}} {_fmt(h.count)}')
            out.append(f"{name}_count{{{base}}} {_fmt(h.count)}")
            out.append(f"{name}_sum{{{base}}} {_fmt(h.sum)}")
            lines.append("\n".join(out))

        for name, (help_, value) in gauges.items():
            gauge(name, help_, value)
        if info:
            labels = ",".join(f"{k}={_label(v)}" for k, v in sorted(info.items()))
            lines.append(
                "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
                "# TYPE vllm:cache_config_info gauge\n"
                f"vllm:cache_config_info{{{base},{labels}}} 1.0"
            )
        counter("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.", self.prefix_cache_queries)
        counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", self.prefix_cache_hits)
        counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", self.num_preemptions)
        counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", self.prompt_tokens)
        counter("vllm:generation_tokens_total", "Number of generation tokens processed.", self.generation_tokens)
        counter("mocker:computed_prefill_tokens_total", "Prompt tokens computed by prefill steps (cache hits and KV transfers excluded).", self.computed_prefill_tokens)
        counter("mocker:engine_steps_total", "Engine steps run.", self.steps)
        for name, (help_, value) in (counters or {}).items():
            counter(name, help_, value)
        lines.append(
            "# HELP vllm:request_success_total Count of successfully processed requests.\n"
            "# TYPE vllm:request_success_total counter\n"
            + "\n".join(
                f'vllm:request_success_total{{{base},finished_reason="{k}"}} {_fmt(v)}'
                for k, v in self.request_success.items()
            )
        )
        histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft)
        histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl)
        histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e)
        histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", self.queue_time)
        histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.request_prompt_tokens)
        histogram("vllm:request_generation_tokens", "Number of generation tokens processed.", self.request_generation_tokens)
        histogram("mocker:kv_transfer_seconds", "KV transfer time of remotely prefilled requests (modelled; measured with --kv-transfer nixl).", self.kv_transfer_seconds)
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'

