"""storelink-agent's commands: init, check-config, status and resync with the service up or
down, and one real ``python -m agent`` process stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.config import AgentConfig, field_help, load_config
from agent.outbox import Outbox
from agent.service import AgentService
from central.broker import free_port
from tests.agent.conftest import STORE, body, sales

STATUS_KEYS = {
    "store_id",
    "epoch",
    "last_seq",
    "pending",
    "oldest_pending_at",
    "last_ack_at",
    "connected",
    "service_running",
    "buffer_bytes",
    "max_buffer_bytes",
    "nats_urls",
}


def write_config(tmp_path: Path, port: int, nats_url: str = "nats://127.0.0.1:1") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'store_id = "{STORE}"\n'
        'data_dir = "data"\n'
        f'[ingest]\nlisten = "127.0.0.1:{port}"\n'
        f'[nats]\nurls = ["{nats_url}"]\n'
    )
    return path


async def filled_outbox(tmp_path: Path, events: int, sent: int) -> str:
    """Create the config's outbox with ``events`` records, the first ``sent`` marked sent."""
    box = Outbox(tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
    await box.open()
    await box.append(sales("a", events))
    if sent:
        await box.mark_sent(1, sent)
    await box.close()
    return box.epoch


def test_every_command_has_help() -> None:
    """Each command answers --help with its description."""
    runner = CliRunner()
    for name, command in cli.commands.items():
        result = runner.invoke(cli, [name, "--help"])
        assert (0, True) == (result.exit_code, bool(command.help)), name


def test_init_writes_a_commented_config_with_every_key(tmp_path: Path) -> None:
    """init writes a config that loads back with the defaults and documents every key."""
    out = tmp_path / "agent.toml"
    result = CliRunner().invoke(cli, ["init", "--store-id", "S42", "--out", str(out)])
    text = out.read_text()
    cfg = load_config(out)
    assert 0 == result.exit_code
    assert (
        msgspec.structs.replace(
            msgspec.convert({"store_id": "S42"}, AgentConfig), data_dir=cfg.data_dir
        )
        == cfg
    )
    written = set()
    for key, value in tomllib.loads(text).items():
        written |= {f"{key}.{sub}" for sub in value} if isinstance(value, dict) else {key}
    assert set(field_help()) == written
    assert all(help_text for help_text in field_help().values())
    again = CliRunner().invoke(cli, ["init", "--out", str(out)])
    assert 1 == again.exit_code and "--force" in again.output


def test_check_config_reports_problems(tmp_path: Path) -> None:
    """check-config passes a good file and names an unknown key or an open listen address."""
    good = write_config(tmp_path, 8787)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('store_id = "S1"\n[ingest]\nlisen = "127.0.0.1:1"\n')
    open_listen = tmp_path / "open.toml"
    open_listen.write_text('store_id = "S1"\n[ingest]\nlisten = "0.0.0.0:8787"\n')
    runner = CliRunner()
    ok = runner.invoke(cli, ["check-config", str(good)])
    bad_key = runner.invoke(cli, ["check-config", str(unknown)])
    bad_listen = runner.invoke(cli, ["check-config", str(open_listen)])
    missing = runner.invoke(cli, ["check-config"])
    assert (0, 1, 1, 2) == (
        ok.exit_code,
        bad_key.exit_code,
        bad_listen.exit_code,
        missing.exit_code,
    )
    assert "lisen" in bad_key.output
    assert "token" in bad_listen.output


def test_status_with_the_service_down_reads_the_database(tmp_path: Path) -> None:
    """status --json, with nothing listening, reads the outbox read-only and says so."""
    config = write_config(tmp_path, free_port())
    epoch = asyncio.run(filled_outbox(tmp_path, events=7, sent=3))
    result = CliRunner().invoke(cli, ["status", "--config", str(config), "--json"])
    report = json.loads(result.output)
    assert 0 == result.exit_code
    assert STATUS_KEYS <= set(report)
    assert (STORE, epoch, 7, 4, False, False) == (
        report["store_id"],
        report["epoch"],
        report["last_seq"],
        report["pending"],
        report["service_running"],
        report["connected"],
    )
    text = CliRunner().invoke(cli, ["status", "--config", str(config)])
    assert "NOT RUNNING" in text.output


def test_status_without_a_database_is_a_clear_error(tmp_path: Path) -> None:
    """status with neither a service nor a database fails with exit 1 and says why."""
    config = write_config(tmp_path, free_port())
    result = CliRunner().invoke(cli, ["status", "--config", str(config)])
    assert 1 == result.exit_code
    assert "never run" in result.output


def test_resync_with_the_service_down_changes_the_database(tmp_path: Path) -> None:
    """resync --all with the service down marks every sent record unsent in the file."""
    config = write_config(tmp_path, free_port())
    asyncio.run(filled_outbox(tmp_path, events=6, sent=6))
    result = CliRunner().invoke(cli, ["resync", "--config", str(config), "--all"])
    status = CliRunner().invoke(cli, ["status", "--config", str(config), "--json"])
    usage = CliRunner().invoke(cli, ["resync", "--config", str(config)])
    assert (0, "6 events will be re-sent") == (result.exit_code, result.output.split(" (")[0])
    assert 6 == json.loads(status.output)["pending"]
    assert 2 == usage.exit_code


@pytest.fixture
async def running_agent(tmp_path: Path) -> AsyncIterator[tuple[AgentService, Path]]:
    """An in-process agent (NATS unreachable) and its config file."""
    config = write_config(tmp_path, free_port())
    agent = AgentService(load_config(config))
    await agent.start()
    try:
        yield agent, config
    finally:
        await agent.stop()


async def test_status_and_resync_through_the_running_service(
    running_agent: tuple[AgentService, Path],
) -> None:
    """With the service up, status and resync go over HTTP to it."""
    agent, config = running_agent
    await agent.outbox.append(sales("a", 4))
    await agent.outbox.mark_sent(1, 4)
    runner = CliRunner()
    # The commands block on HTTP to this very event loop: run them in a thread.
    status = await asyncio.to_thread(
        runner.invoke, cli, ["status", "--config", str(config), "--json"]
    )
    resync = await asyncio.to_thread(
        runner.invoke, cli, ["resync", "--config", str(config), "--from-seq", "3"]
    )
    report = json.loads(status.output)
    assert (True, 4, 0) == (report["service_running"], report["last_seq"], report["pending"])
    assert "2 events will be re-sent (by the running agent)." == resync.output.strip()
    assert 2 == agent.outbox.statistics().pending


async def test_status_and_resync_find_an_agent_run_with_data_dir_and_listen(
    tmp_path: Path,
) -> None:
    """An agent run with --data-dir and --listen other than its config's: status and resync
    given the same overrides reach it; without them status does not find it."""
    config = write_config(tmp_path, free_port())
    listen = f"127.0.0.1:{free_port()}"
    elsewhere = tmp_path / "elsewhere"
    cfg = load_config(config)
    agent = AgentService(
        msgspec.structs.replace(
            cfg,
            data_dir=str(elsewhere),
            ingest=msgspec.structs.replace(cfg.ingest, listen=listen),
        )
    )
    await agent.start()
    try:
        await agent.outbox.append(sales("a", 4))
        await agent.outbox.mark_sent(1, 4)
        runner = CliRunner()
        same = ["--config", str(config), "--data-dir", str(elsewhere), "--listen", listen]
        # The commands block on HTTP to this very event loop: run them in a thread.
        status = await asyncio.to_thread(runner.invoke, cli, ["status", *same, "--json"])
        resync = await asyncio.to_thread(runner.invoke, cli, ["resync", *same, "--from-seq", "3"])
        lost = await asyncio.to_thread(runner.invoke, cli, ["status", "--config", str(config)])
    finally:
        await agent.stop()
    report = json.loads(status.output)
    assert (True, 4) == (report["service_running"], report["last_seq"])
    assert "2 events will be re-sent (by the running agent)." == resync.output.strip()
    assert (1, True) == (lost.exit_code, "never run" in lost.output)


def test_status_resync_and_check_config_take_run_overrides_with_the_service_down(
    tmp_path: Path,
) -> None:
    """With the service down, status and resync given --data-dir read and change that
    outbox, and check-config judges the --listen given (open without a token: refused)."""
    config = write_config(tmp_path, free_port())
    asyncio.run(filled_outbox(tmp_path, events=5, sent=5))
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    runner = CliRunner()
    elsewhere = ["--config", str(config), "--data-dir", str(moved)]
    resync = runner.invoke(cli, ["resync", *elsewhere, "--all"])
    status = runner.invoke(cli, ["status", *elsewhere, "--json"])
    checked = runner.invoke(
        cli, ["check-config", str(config), "--offline", "--listen", "0.0.0.0:8787"]
    )
    assert (0, "5 events will be re-sent") == (resync.exit_code, resync.output.split(" (")[0])
    assert (5, 5) == (json.loads(status.output)["last_seq"], json.loads(status.output)["pending"])
    assert (1, True) == (checked.exit_code, "0.0.0.0:8787" in checked.output)


async def agent_command(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m agent ARGS`` to completion: (exit code, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, stdout=subprocess.PIPE, env=env
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode()


@pytest.mark.skipif(
    sys.platform == "win32", reason="SIGTERM delivery is POSIX; Windows uses CTRL_BREAK"
)
async def test_python_m_agent_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    """A real ``python -m agent run`` accepts events, answers status, and exits 0 on SIGTERM;
    afterwards status reads the database and says the service is not running."""
    port = free_port()
    config = write_config(tmp_path, port)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        "--config",
        str(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            async with http.post(
                url + "/v1/events",
                data=body(*sales("p", 3)),
                headers={"Content-Type": "application/json"},
            ) as resp:
                posted = resp.status
        live_code, live = await agent_command("status", "--config", str(config), "--json", env=env)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    down_code, down = await agent_command("status", "--config", str(config), "--json", env=env)
    assert 202 == posted
    assert (0, True, 3) == (
        live_code,
        json.loads(live)["service_running"],
        json.loads(live)["pending"],
    )
    assert 0 == proc.returncode, output.decode(errors="replace")
    assert (0, False, 3) == (
        down_code,
        json.loads(down)["service_running"],
        json.loads(down)["pending"],
    )


async def _refuse_seq(tmp_path: Path, seq: int) -> None:
    box = Outbox(tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
    await box.open()
    await box.mark_refused_nowait(seq, "too large for HQ")
    await box.close()


def test_status_shows_refused_records_and_resync_offers_them_again(tmp_path: Path) -> None:
    """With the service down, status names the records HQ refused, and an operator's resync
    of their range offers them to HQ again."""
    config = write_config(tmp_path, free_port())
    asyncio.run(filled_outbox(tmp_path, events=3, sent=1))
    asyncio.run(_refuse_seq(tmp_path, 2))
    before = CliRunner().invoke(cli, ["status", "--config", str(config)])
    resync = CliRunner().invoke(
        cli, ["resync", "--config", str(config), "--from-seq", "2", "--to-seq", "2"]
    )
    after = CliRunner().invoke(cli, ["status", "--config", str(config), "--json"])
    assert 0 == before.exit_code and 0 == resync.exit_code
    assert "REFUSED       1 events HQ can never take" in before.output
    assert (0, 2) == (
        json.loads(after.output)["refused_by_hq"],
        json.loads(after.output)["pending"],
    )
