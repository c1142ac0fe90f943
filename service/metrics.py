"""Prometheus metrics in the text exposition format: counters, histograms and gauges read at scrape time."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
Labels = tuple[tuple[str, str], ...]


def _fmt(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped, strict=True)) + "}"


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.values: dict[Labels, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_fmt(k)} {v}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts: dict[Labels, list[int]] = defaultdict(lambda: [0] * len(buckets))
        self.sums: dict[Labels, float] = defaultdict(float)
        self.totals: dict[Labels, int] = defaultdict(int)

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[key][i] += 1
        self.sums[key] += value
        self.totals[key] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key in sorted(self.totals):
            for bound, count in zip(self.buckets, self.counts[key], strict=True):
                lines.append(f"{self.name}_bucket{_fmt(key, (('le', repr(bound)),))} {count}")
            lines.append(f"{self.name}_bucket{_fmt(key, (('le', '+Inf'),))} {self.totals[key]}")
            lines.append(f"{self.name}_sum{_fmt(key)} {self.sums[key]}")
            lines.append(f"{self.name}_count{_fmt(key)} {self.totals[key]}")
        return lines


class Gauge:
    """A value read when scraped: a number, or a mapping from a label value to a number."""

    def __init__(
        self, name: str, help_text: str, read: Callable[[], float | dict[str, float]], label: str = ""
    ) -> None:
        self.name, self.help, self.read, self.label = name, help_text, read, label

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        try:
            value = self.read()
        except Exception:  # a component still loading has nothing to report yet
            return lines
        if isinstance(value, dict):
            lines += [f"{self.name}{_fmt(((self.label, k),))} {v}" for k, v in sorted(value.items())]
        else:
            lines.append(f"{self.name} {value}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = Counter("kplug_requests_total", "HTTP requests by route, method and status.")
        self.latency = Histogram("kplug_request_seconds", "HTTP request latency by route.")
        self.ttft = Histogram("kplug_time_to_first_token_seconds", "Time to first generated token, by mode.")
        self.tokens = Counter("kplug_tokens_generated_total", "Tokens generated, by mode.")
        self.retrieval = Histogram("kplug_retrieval_seconds", "Query embedding and FAISS search time.")
        self.compose = Histogram("kplug_compose_seconds", "Plugin composition time.")
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float | dict[str, float]], label: str = "") -> None:
        self.gauges.append(Gauge(name, help_text, read, label))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests.inc(route=route, method=method, status=str(status))
            self.latency.observe(seconds, route=route)

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []
            for metric in (self.requests, self.latency, self.ttft, self.tokens, self.retrieval, self.compose):
                lines += metric.render()
            for gauge in self.gauges:
                lines += gauge.render()
        return "\n".join(lines) + "\n"
