"""End-to-end fixtures: the whole pipeline as real processes on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from central.demo import Pipeline


def assert_exactly_once_in_order(
    delivered: Sequence[dict[str, object]], sent_ids: Sequence[str], store_id: str
) -> None:
    """Every sent event is in the sink once, under its stable key, in per-store seq order."""
    keys = [str(r["key"]) for r in delivered]
    assert len(keys) == len(set(keys)), "an event reached the sink twice"
    assert sorted(f"{store_id}:{e}" for e in sent_ids) == sorted(keys)
    seqs = [int(r["seq"]) for r in delivered if r["store_id"] == store_id]  # type: ignore[call-overload]
    assert list(range(1, len(sent_ids) + 1)) == seqs


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    """Central with embedded NATS and one agent (store S1), started and stopped by the test."""
    p = Pipeline(root=tmp_path, store_ids=("S1",))
    try:
        yield p
    finally:
        await p.stop()
