"""The published JSON Schema is precise: events generated at random from it
(hypothesis-jsonschema) are what the agent accepts, through its real decode path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis_jsonschema import from_schema

from protocol.events import InvalidEvents, UnparsableBody, decode_pos_events

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "pos-events.schema.json").read_text()
)
EXAMPLES = 100  # ~10-20 s: hypothesis-jsonschema checks every object it builds


def test_events_generated_from_the_schema_are_accepted() -> None:
    """At least 95% of the bodies generated from docs/pos-events.schema.json are accepted by
    decode_pos_events (what HTTP ingest runs); the refusals are counted by their message."""
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same bodies every run: a failure here is reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(from_schema(SCHEMA))
    def decode(body: Any) -> None:
        try:
            decode_pos_events(msgspec.json.encode(body))
        except InvalidEvents as exc:
            outcomes.update(f"{e.path}: {e.message}" for e in exc.errors)
        except UnparsableBody as exc:
            outcomes[str(exc)] += 1
        else:
            outcomes["accepted"] += 1

    decode()
    accepted = outcomes.pop("accepted", 0)
    assert accepted >= 0.95 * EXAMPLES, f"{accepted} of {EXAMPLES} accepted; refused: {outcomes}"
