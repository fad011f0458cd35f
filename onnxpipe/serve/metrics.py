"""Server metrics in the Prometheus text exposition format: counters, gauges and histograms with labels.

Everything is updated from the server's event loop thread, so no locks are needed.

Example:
    >>> m = Metrics()
    >>> m.requests.inc(model="m", status="success")
    >>> 'onnxpipe_requests_total{model="m",status="success"} 1' in m.render()
    True
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def _labels(pairs: tuple[tuple[str, str], ...], extra: str = "") -> str:
    items = [f'{k}="{_escape(v)}"' for k, v in pairs] + ([extra] if extra else [])
    return "{" + ",".join(items) + "}" if items else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Counter:
    """A monotonically increasing count per label set.

    Example:
        >>> c = Counter("x_total", "things")
        >>> c.inc(2, kind="a"); c.value(kind="a")
        2.0
    """

    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    """A value that goes up and down (queue depth, ready workers).

    Example:
        >>> g = Gauge("q", "queue"); g.set(3, model="m"); g.value(model="m")
        3.0
    """

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = float(value)


class Histogram:
    """Observations in cumulative buckets, with their sum and count.

    Example:
        >>> h = Histogram("b", "batch sizes", [1, 2, 4])
        >>> h.observe(3, model="m"); h.count(model="m")
        1
    """

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help
        self.buckets = sorted(float(b) for b in buckets)
        self.series: dict[tuple[tuple[str, str], ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        # per-bucket counts (the last one past every bound), then the sum, then the count
        s = self.series.setdefault(key, [0.0] * (len(self.buckets) + 3))
        s[bisect.bisect_left(self.buckets, value)] += 1
        s[-2] += value
        s[-1] += 1

    def count(self, **labels: str) -> int:
        return int(self.series.get(tuple(sorted(labels.items())), [0.0])[-1])

    def total(self, **labels: str) -> float:
        return self.series.get(tuple(sorted(labels.items())), [0.0, 0.0])[-2]

    def lines(self) -> list[str]:
        out = []
        for key, s in sorted(self.series.items()):
            running = 0.0
            for bound, n in zip(self.buckets, s):
                running += n
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(key, le)} {_num(running)}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(key, inf)} {_num(s[-1])}")
            out.append(f"{self.name}_sum{_labels(key)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(key)} {_num(s[-1])}")
        return out


SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    """Every metric the server exports.

    Example:
        >>> Metrics().render().startswith("# HELP")
        True
    """

    def __init__(self, max_batch: int = 64) -> None:
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max(1, max_batch)})
        self.requests = Counter("onnxpipe_requests_total", "Infer requests by model and outcome.")
        self.errors = Counter("onnxpipe_request_errors_total", "Refused or failed requests by model and HTTP status.")
        self.batches = Counter("onnxpipe_batches_total", "Batches run by model and device.")
        self.batch_size = Histogram("onnxpipe_batch_size", "Samples per batch run on a device.", sizes)
        self.batch_requests = Histogram("onnxpipe_batch_requests", "Requests per batch run on a device.", sizes)
        self.queue = Histogram("onnxpipe_queue_seconds", "Time a request waited before its batch started.", SECONDS)
        self.compute = Histogram("onnxpipe_compute_seconds", "Time a device spent running a batch.", SECONDS)
        self.latency = Histogram("onnxpipe_request_seconds", "Time from receiving a request to its response.", SECONDS)
        self.queue_depth = Gauge("onnxpipe_queue_depth", "Requests waiting to be batched.")
        self.workers_ready = Gauge("onnxpipe_workers_ready", "Device workers ready to run batches.")
        self.restarts = Counter("onnxpipe_worker_restarts_total", "Device workers restarted after they died.")

    def all(self) -> list[Counter | Histogram]:
        return [v for v in vars(self).values() if isinstance(v, (Counter, Histogram))]

    def render(self) -> str:
        """The text exposition format (``text/plain; version=0.0.4``)."""
        out = []
        for m in self.all():
            out += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.lines()]
        return "\n".join(out) + "\n"
