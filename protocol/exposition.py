"""The Prometheus text exposition format (version 0.0.4): the writer both ``/metrics`` pages use.

The format is a few lines of text per metric; writing it by hand costs ~60 lines here, where
``prometheus-client`` would add a dependency and a second registry of counters beside the
``statistics()`` snapshots the parts already keep. ``agent/metrics.py`` and
``central/metrics.py`` read those snapshots at scrape time and write them with ``Exposition``.
Text in, text out: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

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


class Exposition:
    """Metrics in the Prometheus text format: ``add`` each family once, then ``render``."""

    def __init__(self, prefix: str, labels: Labels | None = None) -> None:
        self.prefix = prefix
        self.labels = dict(labels or {})
        self._lines: list[str] = []
        self._names: set[str] = set()

    def add(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: float | bool | list[tuple[Labels, float]],
    ) -> None:
        """One metric family: a single value, or ``[(labels, value), ...]``. Counters are
        named ``*_total`` by the caller; ``kind`` is ``counter``, ``gauge`` or ``info``."""
        full = f"{self.prefix}_{name}"
        if full in self._names:
            raise ValueError(f"metric {full} added twice")
        self._names.add(full)
        self._lines.append(f"# HELP {full} {help_text}")
        self._lines.append(f"# TYPE {full} {'gauge' if kind == 'info' else kind}")
        if not isinstance(samples, list):
            samples = [({}, float(samples))]
        for labels, value in samples:
            merged = {**self.labels, **labels}
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in merged.items())
            sample = f"{full}{{{text}}}" if text else full
            self._lines.append(f"{sample} {_number(value)}")

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"
