"""The Prometheus text exposition format (version 0.0.4): the writer both ``/metrics`` pages use.

The format is a few lines of text per metric; writing it by hand costs ~60 lines here, where
``prometheus-client`` would add a dependency and a second registry of counters beside the
``statistics()`` snapshots the parts already keep. ``agent/metrics.py`` and
``central/metrics.py`` read those snapshots at scrape time and write them with ``Exposition``.
A ``Histogram`` counts observations into buckets where they happen (central's delivery
latency); its ``snapshot()`` is what a status document carries and ``add_histogram`` writes.
Text in, text out: no I/O.
"""

from __future__ import annotations

import datetime as dt
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: Labels) -> str:
    return ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())


class Histogram:
    """Durations counted into buckets by upper bound in seconds (inclusive, as Prometheus's
    ``le``), with their sum and count. Cheap enough for every delivered record: a batch of
    durations is sorted once and split with a ``bisect`` per bucket (tens of nanoseconds a
    value, where one ``bisect`` and float conversion per value cost several hundred)."""

    __slots__ = ("_limits", "_sum", "bounds", "counts")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self._limits = tuple(dt.timedelta(seconds=b) for b in self.bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = dt.timedelta(0)

    def observe_many(self, durations: list[dt.timedelta]) -> None:
        """Count ``durations`` (sorted in place)."""
        durations.sort()
        counts, below = self.counts, 0
        for i, limit in enumerate(self._limits):
            upto = bisect_right(durations, limit)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(durations) - below
        self._sum += sum(durations, dt.timedelta(0))

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: ``le`` the bounds, ``buckets`` the cumulative count at each bound
        (``count`` is the ``+Inf`` one), ``sum`` in seconds."""
        cumulative, running = [], 0
        for n in self.counts[:-1]:
            running += n
            cumulative.append(running)
        return {
            "le": list(self.bounds),
            "buckets": cumulative,
            "sum": self._sum.total_seconds(),
            "count": running + self.counts[-1],
        }


class Exposition:
    """Metrics in the Prometheus text format: ``add`` each family once, then ``render``."""

    def __init__(self, prefix: str, labels: Labels | None = None) -> None:
        self.prefix = prefix
        self.labels = dict(labels or {})
        self._lines: list[str] = []
        self._names: set[str] = set()

    def _family(self, name: str, kind: str, help_text: str) -> str:
        full = f"{self.prefix}_{name}"
        if full in self._names:
            raise ValueError(f"metric {full} added twice")
        self._names.add(full)
        self._lines.append(f"# HELP {full} {help_text}")
        self._lines.append(f"# TYPE {full} {kind}")
        return full

    def add(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: float | bool | list[tuple[Labels, float]],
    ) -> None:
        """One metric family: a single value, or ``[(labels, value), ...]``. Counters are
        named ``*_total`` by the caller; ``kind`` is ``counter``, ``gauge`` or ``info``."""
        full = self._family(name, "gauge" if kind == "info" else kind, help_text)
        if not isinstance(samples, list):
            samples = [({}, float(samples))]
        for labels, value in samples:
            text = _labels({**self.labels, **labels})
            sample = f"{full}{{{text}}}" if text else full
            self._lines.append(f"{sample} {_number(value)}")

    def add_histogram(
        self, name: str, help_text: str, samples: list[tuple[Labels, Mapping[str, Any]]]
    ) -> None:
        """One histogram family from ``Histogram.snapshot()`` documents: per labels set, a
        cumulative ``_bucket`` per bound and ``+Inf``, then ``_sum`` and ``_count``."""
        full = self._family(name, "histogram", help_text)
        for labels, snap in samples:
            merged = {**self.labels, **labels}
            bounds = [*snap["le"], math.inf]
            for le, n in zip(bounds, [*snap["buckets"], snap["count"]], strict=True):
                text = _labels({**merged, "le": _number(le)})
                self._lines.append(f"{full}_bucket{{{text}}} {n}")
            text = _labels(merged)
            suffix = f"{{{text}}}" if text else ""
            self._lines.append(f"{full}_sum{suffix} {_number(snap['sum'])}")
            self._lines.append(f"{full}_count{suffix} {snap['count']}")

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"
