"""Prometheus /metrics on both sides and JSON log lines, from real running processes."""

from __future__ import annotations

import io
import json
import logging
import socket
import urllib.request
from pathlib import Path

from central.broker import free_port
from central.demo import ManagedProcess, Pipeline, _python
from protocol.logformat import configure_logging
from tests.ops.conftest import run_cli
from tests.ops.test_central_cli import ring


def scrape(url: str) -> tuple[str, dict[str, float]]:
    """(content type, {series: value}) of a /metrics page; every family has HELP and TYPE."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    series: dict[str, float] = {}
    described: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            described.add(line.split()[2])
        elif line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            assert name.partition("{")[0] in described, f"{name} has no # TYPE line"
            series[name] = float(value)
    return content_type, series


async def test_metrics_of_central_and_agent(pipeline: Pipeline) -> None:
    """Both /metrics pages are Prometheus text: central labels per-store series by store,
    the agent reports what it accepted and forwarded."""
    await ring(pipeline, "S1", 12)
    port = pipeline.central_http_port
    central_type, central = scrape(f"http://127.0.0.1:{port}/metrics")
    agent_type, agent = scrape(pipeline.agent_url("S1") + "/metrics")
    assert central_type == agent_type == "text/plain; version=0.0.4; charset=utf-8"
    assert {
        "storelink_central_healthy": 1,
        'storelink_central_store_hwm{store="S1"}': 12,
        'storelink_central_store_delivered_total{store="S1"}': 12,
        'storelink_central_store_gap_open{store="S1"}': 0,
        'storelink_central_store_dlq_events{store="S1"}': 0,
        "storelink_central_consumer_delivered_total": 12,
    }.items() <= central.items()
    assert {
        "storelink_agent_connected": 1,
        "storelink_agent_last_seq": 12,
        "storelink_agent_pending_events": 0,
        "storelink_agent_events_accepted_total": 12,
        "storelink_agent_forwarded_events_total": 12,
        "storelink_agent_offline_seconds": 0,
    }.items() <= agent.items()
    [info] = [name for name in agent if name.startswith("storelink_agent_info{")]
    assert 'store="S1"' in info


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    """JSON is the default log format: every line central writes while it works is one JSON
    object with ts, level, logger and msg."""
    with socket.socket() as taken:
        # An HTTP port already in use makes central log and exit at once: lines to check.
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        done = run_cli("central", "run", "--data-dir", str(tmp_path / "c"), "--http", busy)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert (1, True) == (done.returncode, "pick another address with --http" in done.stderr)
    assert {"central.service"} == {line["logger"] for line in lines}
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)


async def test_text_logs_for_humans(tmp_path: Path) -> None:
    """--log-format text writes plain 'time LEVEL logger: message' lines instead."""
    http = free_port()
    process = ManagedProcess(
        "central",
        [*_python("central"), "run", "--data-dir", str(tmp_path / "c"), "--log-format", "text",
         "--nats-listen", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{http}"],
        f"http://127.0.0.1:{http}/healthz",
        tmp_path / "central.log",
    )  # fmt: skip
    try:
        await process.start()
    finally:
        await process.stop()
    lines = (tmp_path / "central.log").read_text().splitlines()
    assert "INFO central.service: central stopped" in lines[-2]
    assert not any(line.startswith("{") for line in lines)


def test_a_wrong_log_format_is_a_usage_error(tmp_path: Path) -> None:
    """An unknown --log-format is refused before anything starts (exit 2), naming the choices."""
    for module, where in (("central", "--data-dir"), ("agent", "--config")):
        done = run_cli(module, "run", where, str(tmp_path / "x"), "--log-format", "xml")
        assert 2 == done.returncode
        assert "'xml' is not one of 'json', 'text'" in done.stderr


def test_json_lines_carry_extra_fields_and_exceptions() -> None:
    """Fields passed with extra= become keys of the JSON line, and a traceback rides along."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        log = logging.getLogger("agent.forwarder")
        log.info("forwarded %d records", 500, extra={"first_seq": 1, "last_seq": 500})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert ("forwarded 500 records", 1, 500) == (
        first["msg"], first["first_seq"], first["last_seq"]
    )  # fmt: skip
    assert ("error", True) == (second["level"], second["exc"].endswith("ValueError: boom"))
