"""The service's counters and histograms, rendered in Prometheus' text exposition format
(version 0.0.4) by hand: a few dozen series do not need a client library. Thread-safe: worker
threads, batch threads and the event loop all record."""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Labels = tuple[tuple[str, str], ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}" if items else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    """Counters, gauges (callables read at scrape time) and histograms, each with a help line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hists: dict[str, tuple[tuple[float, ...], dict[Labels, list[float]]]] = {}
        self._gauges: dict[str, list[tuple[Labels, object]]] = defaultdict(list)

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._help[name] = ("histogram", help)
        self._hists[name] = (tuple(buckets), {})

    def gauge(self, name: str, help: str, read: object, **labels: str) -> None:
        """``read()`` gives the value at scrape time."""
        self._help[name] = ("gauge", help)
        self._gauges[name].append((tuple(sorted(labels.items())), read))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets, series = self._hists[name]
        key = tuple(sorted(labels.items()))
        with self._lock:
            row = series.get(key)
            if row is None:
                row = series[key] = [0.0] * (len(buckets) + 3)  # per-bucket counts, +Inf, sum, count
            row[bisect.bisect_left(buckets, value)] += 1
            row[-2] += value
            row[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (tests, /health)."""
        with self._lock:
            return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._counters.get(name, {}).values())

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            for name, (kind, help) in sorted(self._help.items()):
                out.append(f"# HELP {name} {help}")
                out.append(f"# TYPE {name} {kind}")
                if kind == "counter":
                    for labels, v in sorted(self._counters.get(name, {}).items()):
                        out.append(f"{name}{_fmt_labels(labels)} {_num(v)}")
                elif kind == "gauge":
                    for labels, read in self._gauges[name]:
                        out.append(f"{name}{_fmt_labels(labels)} {_num(float(read()))}")  # type: ignore[operator]
                else:
                    buckets, series = self._hists[name]
                    for labels, row in sorted(series.items()):
                        cum = 0.0
                        for b, c in zip(buckets + (math.inf,), row):
                            cum += c
                            out.append(f"{name}_bucket{_fmt_labels(labels, (('le', _num(b)),))} {_num(cum)}")
                        out.append(f"{name}_sum{_fmt_labels(labels)} {_num(row[-2])}")
                        out.append(f"{name}_count{_fmt_labels(labels)} {_num(row[-1])}")
        return "\n".join(out) + "\n"
