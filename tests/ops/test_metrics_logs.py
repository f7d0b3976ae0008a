"""Prometheus /metrics on both sides and JSON log lines, from real running processes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import urllib.request
from pathlib import Path

from central.broker import free_port
from central.demo import ManagedProcess, Pipeline, _python
from protocol.logformat import configure_logging
from tests.ops.conftest import run_cli
from tests.ops.test_alerts import sample_names
from tests.ops.test_central_cli import ring
from tests.ops.test_inventory import wait_until


def scrape(url: str) -> tuple[str, dict[str, float]]:
    """(content type, {series: value}) of a /metrics page; every family has HELP and TYPE."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    series: dict[str, float] = {}
    described = sample_names(text)
    for line in text.splitlines():
        if line and not line.startswith("#"):
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


def promtool_check_metrics(promtool: str, url: str) -> subprocess.CompletedProcess[str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


async def test_central_metrics_pass_promtool_with_a_latency_histogram_per_event(
    pipeline: Pipeline, promtool: str
) -> None:
    """Central's /metrics after deliveries passes `promtool check metrics`, and each delivered
    event is counted once in both delivery-latency histograms (since occurred, since received)."""
    await ring(pipeline, "S1", 12)
    url = f"http://127.0.0.1:{pipeline.central_http_port}/metrics"
    # The counters move just after the unit's commit, which the file sink's lines precede.
    await wait_until(
        lambda: scrape(url)[1].get("storelink_central_consumer_delivered_total") == 12,
        "central counted its deliveries",
    )
    checked = await asyncio.to_thread(promtool_check_metrics, promtool, url)
    series = scrape(url)[1]
    name = "storelink_central_delivery_latency_seconds"
    assert (0, "", "") == (checked.returncode, checked.stdout, checked.stderr)
    assert {
        f'{name}_count{{since="occurred_at"}}': 12,
        f'{name}_bucket{{since="occurred_at",le="+Inf"}}': 12,
        f'{name}_count{{since="received_at"}}': 12,
        f'{name}_bucket{{since="received_at",le="+Inf"}}': 12,
    }.items() <= series.items()


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
