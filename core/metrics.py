"""Counters, gauges and histograms cheap enough to update per streamed chunk.

prometheus_client's metrics take a lock and go through a value object on every update:
several microseconds per token at gateway rates. These keep plain numbers (one event loop
updates them, so no lock is needed) and turn into Prometheus metric families only when
``/metrics`` is scraped; the exposition format is prometheus_client's own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric


class Counter:
    """A monotonically increasing number, optionally one per label-value tuple."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.value = 0.0
        self._children: dict[tuple[str, ...], Counter] = {}

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def labels(self, *values: str) -> Counter:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = Counter(self.name, self.documentation)
        return child

    def family(self) -> Metric:
        if not self.labelnames:
            return CounterMetricFamily(self.name, self.documentation, value=self.value)
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        return family


class Gauge:
    """A number that goes up and down."""

    def __init__(self, name: str, documentation: str):
        self.name, self.documentation = name, documentation
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, value=self.value)


class Histogram:
    """Observations counted in fixed buckets (upper bounds, inclusive), plus their sum."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]):
        self.name, self.documentation = name, documentation
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_zeros(self, n: int) -> None:
        """``n`` observations of 0 (chunks that arrived together) in one step."""
        self.counts[0] += n

    def family(self) -> Metric:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class MetricSet:
    """The metrics of one process, rendered in the Prometheus text format on demand."""

    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()

    def render(self) -> bytes:
        return generate_latest(self.registry)
