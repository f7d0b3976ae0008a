"""The owner table of central's CPU (tests/bench/owners.py) reads py-spy's folded stacks as
docs/benchmarks.md says: innermost owner first, freeing before anything, waits not counted, each
thread's CPU split by its own samples."""

from __future__ import annotations

from pathlib import Path

from tests.bench.owners import owner, table

MAIN = "thread (7): MainThread;_run_module_as_main (<frozen runpy>:198);run (central/cli.py:199)"
WORKER = "thread (8): central-state_0;Thread._bootstrap (threading.py:1002)"


def test_a_sample_belongs_to_its_innermost_owner() -> None:
    """Libraries and our files are found from the leaf outwards; the interpreter's own C frames
    count for their caller; a dealloc frame makes it freeing, whoever called it."""
    decode = "decode_checked (protocol/events.py:361);mpack_decode (msgspec/_core.so)"
    assert "msgspec" == owner(f"{decode};unicode_decode_utf8 (libpython3.11.so.1.0)".split(";"))
    assert "central/inventory.py" == owner(
        "apply (central/inventory.py:382);dict_get (libpython3.11.so.1.0)".split(";")
    )
    assert "SQLite" == owner(
        "record_keys (central/ledger.py:201);sqlite3_step (libsqlite3.so)".split(";")
    )
    assert "interpreter: freeing (dealloc)" == owner(
        f"{decode};Struct_dealloc_nogc (msgspec/_core.so)".split(";")
    )
    assert "nats-py" == owner("Client._flush_pending (nats/aio/client.py:1469)".split(";"))


def test_each_thread_is_split_by_its_own_samples(tmp_path: Path) -> None:
    """The event loop's 3 ticks go to its samples' owners and the SQLite thread's 1 tick to its
    own; the kernel is the system ticks; waiting samples count for nobody."""
    raw = tmp_path / "central.raw"
    raw.write_text(
        f"{MAIN};apply (central/inventory.py:382) 2\n"
        f"{MAIN};decode_checked (protocol/events.py:361);mpack_decode (msgspec/_core.so) 1\n"
        f"{MAIN};epoll_pwait (libc.so.6) 50\n"
        f"{WORKER};record_keys (central/ledger.py:201);sqlite3_step (libsqlite3.so) 4\n"
        f"{WORKER};_worker (concurrent/futures/thread.py:81);_queue_SimpleQueue_get_impl 40\n"
    )
    rows = dict(table(raw, 7, {7: (10, 5), 8: (0, 0)}, {7: (13, 5), 8: (1, 1)}, 10.0))
    assert {
        "central/inventory.py": 4.0,
        "msgspec": 2.0,
        "SQLite": 2.0,
        "kernel (event-loop thread)": 0.0,
        "kernel (SQLite and other threads)": 2.0,
    } == {name: round(value, 6) for name, value in rows.items()}
