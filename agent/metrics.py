"""Prometheus ``GET /metrics`` for the agent.

Every figure is read at scrape time from the ``statistics()`` snapshots the parts already keep,
so nothing on the hot path changes for metrics; ``protocol.exposition`` writes the text format
(central's ``/metrics`` uses the same writer).

One agent is one store, so the store id, epoch and version are labels of
``storelink_agent_info`` only (join on it, the usual Prometheus pattern); the other series stay
unlabelled and cheap. Central's ``/metrics`` labels every per-store series with ``store``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from protocol.exposition import CONTENT_TYPE, Exposition

__all__ = ["CONTENT_TYPE", "render_agent_metrics"]


def _timestamp(value: Any) -> float:
    """Seconds since the epoch of a datetime or ISO text; 0 for never (Prometheus' custom)."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value.timestamp()


def render_agent_metrics(status: Mapping[str, Any], ingest: Mapping[str, Any], now: float) -> str:
    """The agent's metrics from its status report and its ingest statistics (both as the
    builtins ``msgspec.to_builtins`` makes)."""
    out = Exposition("storelink_agent")
    info = {
        "store": str(status.get("store_id", "")),
        "epoch": str(status.get("epoch", "")),
        "version": str(status.get("version", "")),
    }
    out.add("info", "info", "Always 1; the labels say which store, epoch and version.", [(info, 1)])
    out.add(
        "up",
        "gauge",
        "1 while the service runs and accepts events.",
        bool(status.get("service_running")),
    )
    out.add(
        "connected",
        "gauge",
        "1 while connected to NATS at HQ.",
        bool(status.get("connected", False)),
    )
    forwarder = status.get("forwarder") or {}
    offline_since = _timestamp(forwarder.get("offline_since"))
    out.add(
        "offline_seconds",
        "gauge",
        "Seconds since the link to HQ was lost; 0 while connected.",
        max(0.0, now - offline_since)
        if offline_since and not status.get("connected", False)
        else 0.0,
    )
    out.add("last_seq", "gauge", "Highest seq committed to the outbox.", status.get("last_seq", 0))
    out.add(
        "pending_events",
        "gauge",
        "Events committed but not yet acknowledged by HQ.",
        status.get("pending", 0),
    )
    oldest = _timestamp(status.get("oldest_pending_at"))
    out.add(
        "oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest event not yet acknowledged by HQ; 0 when none.",
        max(0.0, now - oldest) if oldest and status.get("pending", 0) else 0.0,
    )
    out.add(
        "last_ack_timestamp_seconds",
        "gauge",
        "When HQ last acknowledged a batch (Unix time); 0 never.",
        _timestamp(status.get("last_ack_at")),
    )
    out.add("buffer_bytes", "gauge", "Bytes the outbox holds.", status.get("buffer_bytes", 0))
    out.add(
        "buffer_limit_bytes",
        "gauge",
        "outbox.max_buffer_bytes: beyond it ingest answers 507.",
        status.get("max_buffer_bytes", 0),
    )
    out.add(
        "forwarded_batches_total",
        "counter",
        "Batches acknowledged by JetStream.",
        forwarder.get("batches_sent", 0),
    )
    out.add(
        "forwarded_events_total",
        "counter",
        "Events acknowledged by JetStream (re-sends too).",
        forwarder.get("records_sent", 0),
    )
    out.add(
        "inflight_batches",
        "gauge",
        "Batches published and awaiting their PubAck.",
        forwarder.get("inflight", 0),
    )
    out.add(
        "forward_failures_total",
        "counter",
        "Publishes that failed and were retried.",
        forwarder.get("failures", 0),
    )
    out.add(
        "refused_by_hq_total",
        "counter",
        "Events JetStream refused for good (too large) since start; set aside, not retried.",
        forwarder.get("refused", 0),
    )
    out.add(
        "refused_by_hq_events",
        "gauge",
        "Events HQ refused for good, held flagged in the outbox: an operator must act.",
        status.get("refused_by_hq", 0),
    )
    out.add(
        "till_holes",
        "gauge",
        "Holes in workstations' transaction numbers past reconcile.till_grace, as of the last "
        "checkpoint.",
        status.get("till_holes", 0),
    )
    out.add("reconnects_total", "counter", "Reconnections to NATS.", forwarder.get("reconnects", 0))
    out.add("http_requests_total", "counter", "Ingest requests received.", ingest["requests"])
    out.add(
        "events_accepted_total",
        "counter",
        "Events accepted (202, durable).",
        ingest["events_accepted"],
    )
    out.add(
        "events_duplicate_total",
        "counter",
        "Events refused as already held (same event_id).",
        ingest["events_duplicate"],
    )
    refused = sorted((int(code), count) for code, count in ingest["refused"].items())
    out.add(
        "http_refused_total",
        "counter",
        "Ingest requests refused, by HTTP status.",
        [({"status": str(code)}, count) for code, count in refused],
    )
    out.add(
        "damaged_file",
        "gauge",
        "1 when the outbox was found damaged (and moved aside) at start.",
        bool(status.get("damaged_file")),
    )
    return out.render()
