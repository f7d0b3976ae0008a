"""The single-event floors of ``bench_ingest`` do what their figures claim: the durable ones
answer 202 only for an event committed to SQLite, a duplicate as a duplicate, a bad event 400
(docs/benchmarks.md, "What each row means", agent ingest)."""

from __future__ import annotations

import http.client
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from central.broker import free_port
from protocol.events import Event
from protocol.wire import encode_json
from tests.bench.harness import sample_events

ROOT = Path(__file__).parents[1]


def started(kind: str, db: Path) -> Iterator[http.client.HTTPConnection]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.floor_server", "--kind", kind, "--port", str(port),
         "--db", str(db)],
        cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/healthz")
                answer = conn.getresponse()
                assert (200, b"ok") == (answer.status, answer.read())
                break
            except OSError:
                conn.close()
                assert time.monotonic() < deadline, "the floor server did not start"
                time.sleep(0.05)
        try:
            yield conn
        finally:
            conn.close()
    finally:
        proc.kill()
        proc.wait()


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, dict[str, int]]:
    conn.request("POST", "/v1/events", body, {"Content-Type": "application/json"})
    answer = conn.getresponse()
    data = answer.read()
    return answer.status, json.loads(data) if data else {}


@pytest.mark.parametrize("kind", ["durable", "inline", "inline-commit", "inline-sync"])
def test_a_durable_floor_commits_before_its_202_and_refuses_what_the_agent_refuses(
    kind: str, tmp_path: Path
) -> None:
    db = tmp_path / "floor.sqlite"
    first, second, third = sample_events(3)
    for conn in started(kind, db):
        assert (202, {"accepted": 1, "duplicates": 0, "seq": 1}) == post(conn, encode_json(first))
        assert (202, {"accepted": 0, "duplicates": 1}) == post(conn, encode_json(first))
        bad = json.loads(encode_json(second))
        bad["occurred_at"] = "yesterday"
        assert 400 == post(conn, json.dumps(bad).encode())[0]
        assert (202, {"accepted": 1, "duplicates": 0, "seq": 2}) == post(conn, encode_json(second))
        # An array: each event inserted, duplicates counted, one answer after one commit.
        assert (202, {"accepted": 1, "duplicates": 2}) == post(
            conn, encode_json([first, third, second])
        )
        # Read while the server still runs: what it answered 202 for is committed.
        with sqlite3.connect(db) as read:
            rows = read.execute("SELECT seq, event_id, payload FROM records ORDER BY seq")
            rows = rows.fetchall()
        stored = [msgspec.msgpack.decode(payload, type=Event) for _, _, payload in rows]
        ids = [(1, first.event_id), (2, second.event_id), (3, third.event_id)]
        assert ids == [(s, e) for s, e, _ in rows]
        assert [first, second, third] == stored


def test_the_null_floor_answers_without_storing(tmp_path: Path) -> None:
    db = tmp_path / "floor.sqlite"
    for conn in started("null", db):
        assert (202, {"accepted": 1, "duplicates": 0}) == post(conn, b"not even JSON")
    assert not db.exists()
