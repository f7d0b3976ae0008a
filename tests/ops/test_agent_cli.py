"""`storelink-agent status`, `resync`, `check-config` and `init` as an operator runs them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from agent.config import config_from_dict, render_config
from central.demo import Pipeline
from tests.ops.conftest import agent, run_cli
from tests.ops.test_central_cli import ring


async def test_status_and_resync_of_a_running_agent(pipeline: Pipeline) -> None:
    """status asks the running agent (rates over --sample, drain estimate); resync --all goes
    through it and says how many events will be re-sent."""
    await ring(pipeline, "S1", 7)
    done = await agent(pipeline, "S1", "status", "--json", "--sample", "0.2")
    report = json.loads(done.stdout)
    assert (True, True, 7, 0, 0.0) == (
        report["service_running"], report["connected"], report["last_seq"], report["pending"],
        report["rates"]["drain_seconds"],
    )  # fmt: skip
    text = (await agent(pipeline, "S1", "status", "--sample", "0.2")).stdout.splitlines()
    fields = ["store", "service", "NATS", "last", "pending", "last", "commits", "rates", "drain"]
    assert [*fields, "buffer"] == [line.split()[0] for line in text]
    resent = await agent(pipeline, "S1", "resync", "--all")
    assert "7 events will be re-sent (by the running agent)." == resent.stdout.strip()


async def test_check_config_warns_when_hq_does_not_answer(pipeline: Pipeline) -> None:
    """check-config passes while NATS answers; with HQ down it still passes (the agent
    buffers) but warns, naming the URL and what to check."""
    config = str(pipeline.agent_config("S1"))
    ok = run_cli("agent", "check-config", config)
    await pipeline.central.stop()
    warned = run_cli("agent", "check-config", config)
    assert (0, 1) == (ok.returncode, len(ok.stdout.splitlines()))
    assert 0 == warned.returncode
    warning = warned.stdout.splitlines()[1]
    assert warning.startswith(f"warning: NATS at nats://127.0.0.1:{pipeline.nats_port} does not")
    assert "check the network, nats.urls and nats.credentials" in warning


def test_check_config_names_what_is_wrong(tmp_path: Path) -> None:
    """init writes a config check-config accepts; a disk too small for the buffer, a missing
    file and an unknown key each fail (exit 1) with a message that says what to do."""
    config = tmp_path / "agent.toml"
    written = run_cli("agent", "init", "--store-id", "S9", "--out", str(config))
    assert f"wrote {config}" == written.stdout.strip()
    data = tomllib.loads(config.read_text())
    data["data_dir"] = str(tmp_path / "data")
    config.write_text(render_config(config_from_dict(data, base_dir=tmp_path)))
    ok = run_cli("agent", "check-config", str(config), "--offline")
    assert (0, f"{config}: ok (store S9, data in {tmp_path / 'data'})") == (
        ok.returncode, ok.stdout.strip()
    )  # fmt: skip

    data["outbox"]["max_buffer_bytes"] = 2**62
    huge = tmp_path / "huge.toml"
    huge.write_text(render_config(config_from_dict(data, base_dir=tmp_path)))
    too_big = run_cli("agent", "check-config", str(huge), "--offline")
    assert 1 == too_big.returncode
    assert "free disk space or lower outbox.max_buffer_bytes" in too_big.stderr

    missing = run_cli("agent", "check-config", str(tmp_path / "nope.toml"))
    assert (1, f"Error: {tmp_path / 'nope.toml'} does not exist: write one with") == (
        missing.returncode, missing.stderr.partition(" `")[0]
    )  # fmt: skip
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(config.read_text() + "\ncolour = 'red'\n")
    bad_key = run_cli("agent", "check-config", str(unknown))
    assert (1, True) == (bad_key.returncode, "colour" in bad_key.stderr)
