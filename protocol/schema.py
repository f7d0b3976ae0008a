"""The JSON Schema of what a POS may send (and of the OMS record), generated from the Structs.

``python -m protocol.schema pos`` prints the POS-facing schema kept in
``docs/pos-events.schema.json``; ``python -m protocol.schema oms`` the OMS record's, kept in
``docs/oms-record.schema.json``. A test fails when either file is stale.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Annotated, Any

import msgspec

from protocol.events import MAX_EVENTS_PER_REQUEST, NON_NEGATIVE_PATTERN, Event
from protocol.wire import OmsRecord

EventList = Annotated[list[Event], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)]

SCHEMAS: dict[str, Any] = {
    "pos": Event | EventList,
    "oms": OmsRecord,
}


def _rules_across_types(defs: dict[str, Any]) -> None:
    """The rules msgspec cannot attach to a field, added to the generated schema: a post-void
    names what it voids (PostVoid.__post_init__), a count's quantities are never negative
    (``_check_stock``: a count's lines are StockLines, signed in an adjustment)."""
    if "PostVoid" in defs:
        defs["PostVoid"]["anyOf"] = [
            {"required": [name], "properties": {name: {"type": "string"}}}
            for name in ("voided_event_id", "voided_transaction_id")
        ]
    if "StockCount" in defs:
        line = copy.deepcopy(defs["StockLine"])
        line["title"] = "CountLine"
        line["description"] = "A SKU and its counted on-hand figure (>= 0)."
        quantity = line["properties"]["quantity"]
        quantity["pattern"] = NON_NEGATIVE_PATTERN
        quantity["description"] = quantity["description"].replace(
            "A signed delta in an adjustment; >= 0 in a count.", "Zero or more."
        )
        defs["CountLine"] = line
        defs["StockCount"]["properties"]["lines"]["items"] = {"$ref": "#/$defs/CountLine"}


def render(name: str) -> str:
    """The schema ``name`` as stable, pretty JSON text."""
    schema = msgspec.json.schema(SCHEMAS[name])
    _rules_across_types(schema.get("$defs", {}))
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1 else "pos"))
