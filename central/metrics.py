"""Prometheus ``GET /metrics`` for central, rendered from the same document as ``/v1/status``.

Per-store series carry a ``store`` label; per-sink series a ``sink`` label. Every figure comes
from the ``statistics()`` snapshots and the state database at scrape time. The text format is
written by ``protocol.exposition``, the writer the agent's ``/metrics`` uses too.

What an alert rule would look at (docs/operations.md has the runbook for each):
``storelink_central_healthy == 0``, ``storelink_central_store_gap_open == 1`` for minutes,
``storelink_central_store_dlq_events > 0``, ``time() - storelink_central_store_last_seen_
timestamp_seconds`` large for a store that trades, ``storelink_central_sink_breaker_open == 1``,
``storelink_central_sink_misconfigured == 1``, ``storelink_central_oms_consumer_oldest_pending_
age_seconds`` near ``storelink_central_oms_stream_max_age_seconds``, ``storelink_central_store_
agent_reachable == 0`` (cut off, not idle). The rules, tested with promtool, are docs/alerts.yml.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.exposition import CONTENT_TYPE, Exposition

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "render_central_metrics"]

# Delivery latency buckets (seconds): milliseconds when all is well, up to a day for a store
# that was offline (its events wait at the agent and arrive late, as they should).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600,
    86400,
)  # fmt: skip


def render_central_metrics(status: Mapping[str, Any], now: float) -> str:
    """Central's metrics from its status document (``CentralService.status()``)."""
    out = Exposition("storelink_central")
    out.add(
        "healthy",
        "gauge",
        "1 while consuming with NATS connected (as /healthz).",
        bool(status.get("healthy")),
    )
    nats = status.get("nats") or {}
    out.add("nats_connected", "gauge", "1 while connected to NATS.", bool(nats.get("connected")))
    out.add(
        "broker_restarts_total",
        "counter",
        "Times the embedded nats-server was restarted.",
        nats.get("broker_restarts", 0),
    )
    out.add(
        "started_timestamp_seconds",
        "gauge",
        "When this central started (Unix time).",
        status.get("started_at") or 0,
    )
    consumer = status.get("consumer") or {}
    for key, help_text in (
        ("units", "Units of work (fetches) committed."),
        ("batches", "Batches processed."),
        ("delivered", "Events delivered to every sink."),
        ("duplicates", "Events dropped as already delivered (redeliveries, re-sends)."),
        ("dlq", "Batches and records sent to the DLQ by this process."),
        ("held", "Batch deliveries held back behind a gap (or undecodable)."),
        ("released", "Batches over a store's cap of held ones, acked to be re-sent later."),
        ("resync_requests", "Resync requests sent to stores for gaps."),
        ("resync_unanswered", "Resync requests no store answered."),
        ("sink_failures", "Units retried because a sink could not take them."),
        ("ledger_duplicates", "Events dropped because their event_id was delivered before."),
    ):
        out.add(f"consumer_{key}_total", "counter", help_text, consumer.get(key, 0))
    last_unit = consumer.get("last_unit_at") or 0
    out.add(
        "consumer_last_unit_timestamp_seconds",
        "gauge",
        "When the last unit of work committed (Unix time); 0 never.",
        last_unit,
    )
    state = status.get("state") or {}
    out.add(
        "state_commits_total", "counter", "State transactions committed.", state.get("commits", 0)
    )
    out.add(
        "state_last_commit_seconds",
        "gauge",
        "Duration of the last state transaction.",
        state.get("last_commit_seconds", 0.0),
    )
    sinks = status.get("sinks") or []
    out.add(
        "sink_records_total",
        "counter",
        "Records the OMS sink accepted.",
        [({"sink": s["sink"]}, s.get("records", 0)) for s in sinks],
    )
    out.add(
        "sink_rejected_total",
        "counter",
        "Records the OMS refused for good (to the DLQ).",
        [({"sink": s["sink"]}, s.get("rejected", 0)) for s in sinks],
    )
    out.add(
        "sink_retries_total",
        "counter",
        "Retried deliveries (5xx, timeouts).",
        [({"sink": s["sink"]}, s.get("retries", 0)) for s in sinks],
    )
    out.add(
        "sink_breaker_open",
        "gauge",
        "1 while the sink's circuit breaker is open.",
        [({"sink": s["sink"]}, s.get("breaker") == "open") for s in sinks],
    )
    out.add(
        "sink_misconfigured",
        "gauge",
        "1 while the OMS answers as misconfigured (3xx, 401, 403, 404, ...): retried, never "
        "dead-lettered; /v1/status has the answer.",
        [({"sink": s["sink"]}, bool(s.get("misconfigured"))) for s in sinks],
    )
    oms = status.get("oms_stream") or {}
    readers = oms.get("consumers") or []
    out.add(
        "oms_stream_max_age_seconds",
        "gauge",
        "How long STORELINK_OMS keeps a record (nats sink): an OMS consumer further behind "
        "loses it.",
        [({}, oms["max_age"])] if oms else [],
    )
    out.add(
        "oms_consumer_pending_records",
        "gauge",
        "Records an OMS durable consumer on STORELINK_OMS has not acknowledged.",
        [({"consumer": c["consumer"]}, c["pending"]) for c in readers],
    )
    out.add(
        "oms_consumer_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest record an OMS durable consumer has not acknowledged; 0 without.",
        [
            ({"consumer": c["consumer"]}, max(0.0, round(now - c["oldest_pending_at"], 3))
             if c["oldest_pending_at"] else 0)
            for c in readers
        ],
    )  # fmt: skip
    latency = status.get("delivery_latency") or {}
    out.add_histogram(
        "delivery_latency_seconds",
        "From an event to the OMS sink accepting it: since it occurred (since=\"occurred_at\", "
        "the POS's clock) or since its agent committed it (since=\"received_at\").",
        [({"since": since}, latency[since]) for since in ("occurred_at", "received_at")
         if since in latency],
    )  # fmt: skip
    stores = status.get("stores") or []

    def per_store(key: str) -> list[tuple[Mapping[str, str], float]]:
        return [({"store": s["store_id"]}, float(s.get(key) or 0)) for s in stores]

    def known(key: str) -> list[tuple[Mapping[str, str], float]]:
        """Only the stores whose ``key`` is known (not None): an unknown figure is absent."""
        return [({"store": s["store_id"]}, s[key]) for s in stores if s.get(key) is not None]

    out.add("stores", "gauge", "Stores central knows (provisioned or seen).", len(stores))
    out.add(
        "store_hwm",
        "gauge",
        "High-water mark: every seq up to it is delivered (latest epoch).",
        per_store("hwm"),
    )
    out.add(
        "store_delivered_total", "counter", "Events delivered, all epochs.", per_store("delivered")
    )
    out.add(
        "store_duplicates_total",
        "counter",
        "Duplicate events dropped, all epochs.",
        per_store("duplicates"),
    )
    # Key ledger (central/ledger.py).
    out.add(
        "store_resent_duplicates_total",
        "counter",
        "Events dropped because the store's event_id was delivered before (under another seq).",
        per_store("resent"),
    )
    out.add(
        "store_ledger_keys",
        "gauge",
        "Delivered event_ids the ledger holds.",
        per_store("ledger_keys"),
    )
    out.add(
        "ledger_keys",
        "gauge",
        "Delivered event_ids the ledger holds, all stores.",
        sum(s.get("ledger_keys") or 0 for s in stores),
    )
    # Reconciliation (central/reconcile.py): business days per state, latest judgement.
    out.add(
        "store_reconcile_states",
        "gauge",
        "Business days of the store per reconciliation state (reconciled, untracked, pending, "
        "skipped, healing, missing, mismatch), as last judged against its checkpoint.",
        [
            ({"store": s["store_id"], "state": state}, n)
            for s in stores
            for state, n in sorted((s.get("reconcile") or {}).items())
        ],
    )
    out.add(
        "store_till_holes",
        "gauge",
        "Holes in the store's workstations' transaction numbers (a till transaction that never "
        "reached the agent), as its last checkpoint reported them.",
        per_store("till_holes"),
    )
    ledger = status.get("ledger") or {}
    out.add(
        "ledger_pruned_total",
        "counter",
        "Expired keys pruned from the ledger by this process.",
        ledger.get("pruned", 0),
    )
    out.add(
        "store_last_seen_timestamp_seconds",
        "gauge",
        "When a batch of the store last arrived (Unix time); 0 never.",
        per_store("last_seen"),
    )
    gaps = [(s["store_id"], s.get("gap")) for s in stores]
    out.add(
        "store_gap_open",
        "gauge",
        "1 while seqs are missing and later batches wait.",
        [({"store": sid}, gap is not None) for sid, gap in gaps],
    )
    out.add(
        "store_gap_missing_events",
        "gauge",
        "Seqs missing in the open gap; 0 without one.",
        [
            (
                {"store": s["store_id"]},
                sum(g["to_seq"] - g["from_seq"] + 1 for g in s.get("gaps") or []),
            )
            for s in stores
        ],
    )
    out.add(
        "store_gap_age_seconds",
        "gauge",
        "How long the open gap has been open; 0 without.",
        [({"store": sid}, max(0.0, now - gap["since"]) if gap else 0) for sid, gap in gaps],
    )
    out.add(
        "store_gap_unrecoverable",
        "gauge",
        "1 when the store answered it can no longer re-send part of a gap: only an "
        "operator's `gaps skip` closes it.",
        [
            ({"store": s["store_id"]}, any(g["unrecoverable"] for g in s.get("gaps") or []))
            for s in stores
        ],
    )
    out.add(
        "store_gap_skips_total",
        "counter",
        "Gap skips operators recorded for the store (`storelink-central gaps skip`).",
        [({"store": s["store_id"]}, len(s.get("skips") or [])) for s in stores],
    )
    held = [(s["store_id"], s.get("held") or {}) for s in stores]
    out.add(
        "store_held_batches",
        "gauge",
        "Batches of the store held back (behind a gap, or undecodable).",
        [({"store": sid}, h.get("held_batches", 0)) for sid, h in held],
    )
    out.add(
        "store_released_batches_total",
        "counter",
        "Batches over the store's cap of held ones, acked to be asked for again.",
        [({"store": sid}, h.get("released_batches", 0)) for sid, h in held],
    )
    out.add(
        "store_held_oldest_age_seconds",
        "gauge",
        "Age in the stream of the store's oldest held batch (it expires at the stream's "
        "max_age); 0 when none.",
        [
            ({"store": sid}, max(0.0, now - h["oldest_held_at"]) if h.get("oldest_held_at") else 0)
            for sid, h in held
        ],
    )
    out.add(
        "store_held_expiring",
        "gauge",
        "1 when the store's oldest held batch has used consumer.expiry_alert_fraction of "
        "the stream's max_age.",
        [({"store": sid}, bool(h.get("expiring"))) for sid, h in held],
    )
    out.add(
        "store_blocked",
        "gauge",
        "1 while the store is parked: the OMS keeps failing on the record `key` while it "
        "takes other stores' (its events are held, in order).",
        [({"store": sid, "key": h["blocked"]["key"]}, 1) for sid, h in held if h.get("blocked")],
    )
    out.add(
        "store_blocked_seconds",
        "gauge",
        "How long the store has been parked; 0 when it is not.",
        [
            ({"store": sid}, max(0.0, now - h["blocked"]["since"]) if h.get("blocked") else 0)
            for sid, h in held
        ],
    )
    out.add(
        "store_undecodable_held",
        "gauge",
        "1 while a batch of the store that central cannot decode is held (central older "
        "than the agent?).",
        [({"store": sid}, h.get("undecodable") is not None) for sid, h in held],
    )
    out.add(
        "store_dlq_events", "gauge", "Dead letters central filed for the store.", per_store("dlq")
    )
    # Inventory (central/inventory.py).
    out.add(
        "store_inventory_unmatched_voids",
        "gauge",
        "Post-voids whose sale central has not seen after inventory.void_wait_seconds.",
        per_store("inventory_unmatched_voids"),
    )
    out.add(
        "store_inventory_flags_total",
        "counter",
        "Events the inventory projection flagged (duplicate or mismatched voids, late counts).",
        per_store("inventory_flags"),
    )
    # What the store's agent last said (central/estate.py's agent watch): told apart from its
    # batches, so an idle store (answers, sends nothing) is not a cut-off one (does not answer).
    asked = [s for s in stores if (s.get("agent") or {}).get("reachable") is not None]
    out.add(
        "store_agent_reachable",
        "gauge",
        "1 when the store's agent answered central's last round of asking, 0 when it did not "
        "(stopped, or cut off from NATS); absent before the first round.",
        [({"store": s["store_id"]}, bool(s["agent"]["reachable"])) for s in asked],
    )
    out.add(
        "store_agent_last_heard_timestamp_seconds",
        "gauge",
        "When the store's agent last answered or sent a heartbeat (Unix time); 0 never.",
        per_store("last_heard"),
    )
    out.add(
        "store_lag_events",
        "gauge",
        "Events the store's agent committed that central has not delivered (as it last said).",
        known("lag_events"),
    )
    out.add(
        "store_lag_seconds",
        "gauge",
        "How far behind central is for the store: the age of the oldest event the agent has not "
        "had acknowledged, or since its last batch when central is the one behind.",
        known("lag_seconds"),  # known only with lag_events (central/control.py lag)
    )
    out.add(
        "store_delivery_eta_seconds",
        "gauge",
        "Seconds until central has delivered the store's lag at its delivery rate since its "
        "backlog began (at most the last 5 minutes); absent when it has no lag, or delivered "
        "nothing of it lately.",
        known("delivery_eta_seconds"),
    )
    reported = [s for s in stores if s.get("reported")]
    out.add(
        "store_pending_events",
        "gauge",
        "Events at the store not yet acknowledged by JetStream, as its agent last reported.",
        [({"store": s["store_id"]}, s["reported"]["pending"]) for s in reported],
    )
    out.add(
        "store_provisioned",
        "gauge",
        "1 if provisioned with `stores add` (and not removed).",
        [({"store": s["store_id"]}, bool(s.get("provisioned"))) for s in stores],
    )
    return out.render()
