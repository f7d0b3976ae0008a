"""TLS on the NATS port with certificates from `storelink-central pki init`, against central's
real embedded nats-server: the right CA connects, a wrong or missing CA does not, plain TCP
does not, and with mutual TLS a client without a certificate from the CA does not either.
One pipeline of real processes (central, agent) runs the whole way over mutual TLS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from agent.config import load_config as load_agent_config
from agent.service import nats_auth
from agent.simulator import Till, post_events
from central.broker import free_port
from central.demo import Pipeline
from central.pki import PkiFiles, init_pki
from central.provision import provision_store
from central.service import CentralService
from protocol.connection import connect_options
from protocol.subjects import inbox_prefix
from tests.central.conftest import central_config, start_central, stop_central
from tests.e2e.conftest import assert_exactly_once_in_order
from tests.ops.conftest import run_cli

# Refused TLS handshakes leave nats-py's sockets to the garbage collector (see conftest).
pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in.*(StreamWriter|_SelectorTransport|socket\.socket)"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.usefixtures("collect_refused_sockets"),
]


@pytest.fixture
def pki(tmp_path: Path) -> PkiFiles:
    return init_pki(tmp_path / "pki", ["127.0.0.1"])


def tls_settings(pki: PkiFiles, *, verify: bool) -> dict[str, Any]:
    return {
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "ca": str(pki.ca),
        "verify": verify,
        "client_cert": str(pki.central_cert),
        "client_key": str(pki.central_key),
        "ca_key": str(pki.ca_key),
    }


async def tls_central(
    tmp_path: Path, pki: PkiFiles, *, verify: bool
) -> tuple[CentralService, Any, str]:
    port = free_port()
    cfg = central_config(
        tmp_path,
        "",
        **{
            "nats.urls": [],
            "nats.listen": f"127.0.0.1:{port}",
            "nats.tls": tls_settings(pki, verify=verify),
        },
    )
    service, task = await start_central(cfg)  # central itself connects over (mutual) TLS
    return service, task, f"nats://127.0.0.1:{port}"


@pytest.fixture
async def server_tls(tmp_path: Path, pki: PkiFiles) -> AsyncIterator[str]:
    service, task, url = await tls_central(tmp_path, pki, verify=False)
    try:
        yield url
    finally:
        await stop_central(service, task)


@pytest.fixture
async def mutual_tls(tmp_path: Path, pki: PkiFiles) -> AsyncIterator[str]:
    service, task, url = await tls_central(tmp_path, pki, verify=True)
    try:
        yield url
    finally:
        await stop_central(service, task)


def provisioned_agent_auth(tmp_path: Path, url: str) -> tuple[dict[str, Any], Path]:
    """`stores add S1`, then the nats-py options the agent builds from its agent.toml."""
    out = tmp_path / "stores" / "S1"
    provision_store(tmp_path / "central", "S1", out, nats_url=url, force=False)
    cfg = load_agent_config(out / "agent.toml")
    return nats_auth(cfg), out


async def connect(url: str, **options: Any) -> Any:
    return await nats.connect(
        url, connect_timeout=2, allow_reconnect=False, inbox_prefix=inbox_prefix("S1"), **options
    )


async def test_agent_trusts_the_ca_from_stores_add(server_tls: str, tmp_path: Path) -> None:
    """`stores add` puts the CA beside the agent's config; the agent connects with it."""
    options, out = provisioned_agent_auth(tmp_path, server_tls)
    assert (out / "ca.pem").is_file() and isinstance(options.get("tls"), ssl.SSLContext)
    nc = await connect(server_tls, **options)
    try:
        assert nc.is_connected
    finally:
        await nc.close()


async def test_wrong_or_missing_ca_and_plain_tcp_fail(server_tls: str, tmp_path: Path) -> None:
    """A CA that did not sign the server's certificate, the system trust store (no CA given),
    or no TLS at all: no connection, and the error says why."""
    _, out = provisioned_agent_auth(tmp_path, server_tls)
    creds = str(out / "store.nk")
    other = init_pki(tmp_path / "other-pki", ["127.0.0.1"])
    for attempt in (
        connect_options(creds, tls_ca=str(other.ca)),
        connect_options(creds, tls_ca=""),  # plain client: nats-py upgrades with system CAs
    ):
        with pytest.raises(Exception) as refused:
            await connect(server_tls, **attempt)
        assert "certificate verify failed" in str(refused.value).lower()


async def test_mutual_tls_needs_a_client_certificate(mutual_tls: str, tmp_path: Path) -> None:
    """With verify on, `stores add` issues the store a client certificate and it connects;
    the right CA and credentials without a client certificate are refused."""
    options, out = provisioned_agent_auth(tmp_path, mutual_tls)
    assert (out / "store.pem").is_file() and 0o600 == (out / "store.key").stat().st_mode & 0o777
    nc = await connect(mutual_tls, **options)
    await nc.close()
    no_cert = connect_options(str(out / "store.nk"), tls_ca=str(out / "ca.pem"))
    with pytest.raises(Exception):  # noqa: B017 - the server drops the handshake: no fixed type
        await connect(mutual_tls, **no_cert)


async def test_pipeline_over_mutual_tls(tmp_path: Path, pki: PkiFiles) -> None:
    """Real central and agent processes, configured only by `pki init` output and `stores add`:
    events reach the OMS sink over mutual TLS."""
    init = run_cli("central", "pki", "init", "--dir", str(tmp_path / "pki2"), "--host", "hq")
    assert 0 == init.returncode, init.stderr
    snippet = init.stdout.split("add to central's config (--config):\n", 1)[1]
    config = tmp_path / "central.toml"
    config.write_text(snippet.replace("# verify = true", "verify = true"))
    p = Pipeline(root=tmp_path / "run", store_ids=("S1",), central_args=["--config", str(config)])
    await p.start()
    try:
        events = list(Till(store_id="S1", seed=9).events(25))
        await post_events(p.agent_url("S1"), events)
        delivered = await p.wait_delivered(25)
        # Sent over 8 connections at once: stored (seq) in the order they arrived.
        assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")
        assert "tls_ca" in p.agent_config("S1").read_text()
    finally:
        await p.stop()
