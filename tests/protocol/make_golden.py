"""Write the golden samples of the current wire version. Run only when adding a version:
``python -m tests.protocol.make_golden v2``; old version dirs are never rewritten."""

from __future__ import annotations

import sys
from pathlib import Path

from protocol.wire import (
    CODECS,
    encode,
    encode_json,
    encode_packed_batch,
    encode_raw_batch,
    encode_record,
)
from tests.protocol.samples import EPOCH, EVENTS, RECORDS

if __name__ == "__main__":
    out = Path(__file__).parent / "golden" / sys.argv[1]
    if out.exists():
        raise SystemExit(f"{out} exists: golden samples are never rewritten")
    out.mkdir(parents=True)
    (out / "events.json").write_bytes(encode_json(EVENTS) + b"\n")
    (out / "events.msgpack").write_bytes(encode(EVENTS))
    records = [encode_record(r) for r in RECORDS]
    (out / "batch.msgpack").write_bytes(encode_raw_batch("S001", EPOCH, 1, len(RECORDS), records))
    for codec in CODECS:  # packed batches, from v2 on
        packed = encode_packed_batch(codec, "S001", EPOCH, 1, len(RECORDS), records)
        (out / f"batch-{codec}.msgpack").write_bytes(packed)
