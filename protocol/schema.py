"""The JSON Schema of what a POS may send (and of the OMS record), generated from the Structs.

``python -m protocol.schema pos`` prints the POS-facing schema kept in
``docs/pos-events.schema.json``; ``python -m protocol.schema oms`` the OMS record's, kept in
``docs/oms-record.schema.json``. A test fails when either file is stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from protocol.events import Event
from protocol.wire import OmsRecord

SCHEMAS: dict[str, Any] = {
    "pos": Event | list[Event],
    "oms": OmsRecord,
}


def render(name: str) -> str:
    """The schema ``name`` as stable, pretty JSON text."""
    schema = msgspec.json.schema(SCHEMAS[name])
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1 else "pos"))
