"""The systemd units agree with the code they run: paths, ports, readiness and stop timeouts.

No systemd runs here, so these read the unit files; ``systemd-analyze verify`` was run on them
by hand (docs/install.md says how).
"""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from agent.config import DEFAULT_DATA_DIR, DEFAULT_PUBLISH_TIMEOUT
from agent.ingest import SHUTDOWN_TIMEOUT
from agent.service import STOP_GRACE
from central.broker import READY_TIMEOUT
from central.config import DEFAULT_HTTP_LISTEN

ROOT = Path(__file__).parents[2]
SYSTEMD = ROOT / "packaging" / "systemd"
HARDENING = ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are cased
    parser.read_string((SYSTEMD / name).read_text())
    return parser


@pytest.mark.parametrize("name", ["storelink-agent.service", "storelink-central.service"])
def test_units_run_confined_as_their_own_user(name: str) -> None:
    """Each unit runs as a dedicated user, restarts on failure within limits, is hardened and
    may write only its state directory."""
    service = unit(name)["Service"]
    state = service["StateDirectory"]
    assert (name.removesuffix(".service"), name.removesuffix(".service")) == (
        service["User"],
        state,
    )
    assert ("on-failure", "strict") == (service["Restart"], service["ProtectSystem"])
    assert 0 < int(unit(name)["Unit"]["StartLimitBurst"])
    assert {key: "yes" for key in HARDENING} == {key: service[key] for key in HARDENING}
    assert f"/var/lib/{state}" == service["ReadWritePaths"]


def test_agent_unit_waits_for_ready_and_outlasts_a_clean_stop() -> None:
    """Type=notify (the bootloader's child notifies, so NotifyAccess=all); the stop timeout
    exceeds the agent's longest clean stop; config and data paths match the defaults."""
    service = unit("storelink-agent.service")["Service"]
    assert ("notify", "all", "mixed") == (
        service["Type"],
        service["NotifyAccess"],
        service["KillMode"],
    )
    longest_clean_stop = SHUTDOWN_TIMEOUT + DEFAULT_PUBLISH_TIMEOUT + STOP_GRACE
    assert int(service["TimeoutStopSec"]) >= 2 * longest_clean_stop
    assert (
        "/usr/local/bin/storelink-agent run --config /etc/storelink-agent/agent.toml"
        == service["ExecStart"]
    )
    assert DEFAULT_DATA_DIR == f"/var/lib/{service['StateDirectory']}"


def test_central_unit_checks_the_health_port_central_listens_on() -> None:
    """The ExecStartPost health check polls central's default HTTP address, and the start
    timeout leaves room for the embedded nats-server's own."""
    service = unit("storelink-central.service")["Service"]
    assert f"http://{DEFAULT_HTTP_LISTEN}/healthz" in service["ExecStartPost"]
    assert int(service["TimeoutStartSec"]) > READY_TIMEOUT
    assert service["ExecStart"].startswith(
        "/usr/local/bin/storelink-central run --data-dir /var/lib/storelink-central "
    )
