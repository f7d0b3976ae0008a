"""The embedded nats-server secure by default, as real processes: on a non-loopback
`--nats-listen` (0.0.0.0, reached here through 127.0.0.1) central turns mutual TLS on by itself
with a private CA, and `stores add` equips the agent to deliver over it; `--allow-plaintext`
serves it in clear text, and the log and status say so."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
from cryptography import x509

from agent.simulator import Till, post_events
from central.broker import free_port
from central.demo import Pipeline
from central.service import secure_broker
from protocol.connection import connect_options
from tests.central.conftest import central_config
from tests.e2e.conftest import assert_exactly_once_in_order
from tests.ops.conftest import run_cli

# A refused TLS handshake leaves nats-py's socket to the garbage collector (see conftest).
pytestmark = [
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in.*(StreamWriter|_SelectorTransport|socket\.socket)"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
    pytest.mark.usefixtures("collect_refused_sockets"),
]


def http_status(pipeline: Pipeline) -> dict[str, Any]:
    url = f"http://127.0.0.1:{pipeline.central_http_port}/v1/status"
    with urllib.request.urlopen(url, timeout=5) as resp:
        document: dict[str, Any] = json.loads(resp.read())
    return document


def exposed(root: Path, store_ids: tuple[str, ...], *args: str) -> Pipeline:
    """A pipeline whose embedded nats-server listens on all interfaces."""
    port = free_port()
    return Pipeline(
        root=root, store_ids=store_ids, nats_port=port,
        central_args=["--nats-listen", f"0.0.0.0:{port}", *args],
    )  # fmt: skip


async def test_a_non_loopback_nats_listen_turns_tls_on_and_a_provisioned_agent_delivers(
    tmp_path: Path,
) -> None:
    """`run --nats-listen 0.0.0.0:PORT`: central makes a CA and serves mutual TLS (a plain
    client is refused); the agent `stores add` provisioned connects over it and delivers."""
    p = exposed(tmp_path, ("S1",))
    await p.start()
    try:
        events = list(Till(store_id="S1", seed=4).events(10))
        await post_events(p.agent_url("S1"), events)
        delivered = await p.wait_delivered(10)
        creds = str(p.agent_config("S1").parent / "store.nk")
        with pytest.raises(Exception) as refused:
            await nats.connect(
                f"nats://127.0.0.1:{p.nats_port}", connect_timeout=2, allow_reconnect=False,
                **connect_options(creds),
            )  # fmt: skip
        status = http_status(p)
    finally:
        await p.stop()
    agent_toml = p.agent_config("S1").read_text()
    # Sent over 8 connections at once: stored (seq) in the order they arrived.
    assert_exactly_once_in_order(delivered, [e.event_id for e in events], "S1")
    assert (True, False) == (status["nats"]["tls"], status["nats"]["plaintext_exposed"])
    assert ("tls_ca" in agent_toml, "tls_cert" in agent_toml) == (True, True)
    assert (p.central_dir / "pki" / "ca.key").is_file()
    assert "certificate verify failed" in str(refused.value).lower()


async def test_allow_plaintext_serves_without_tls_and_says_so(tmp_path: Path) -> None:
    """`--allow-plaintext` on 0.0.0.0: no TLS and no CA made; the log, /v1/status and
    `storelink-central status` say NATS is in clear text."""
    p = exposed(tmp_path, (), "--allow-plaintext")
    await p.start()
    try:
        status = http_status(p)
        shown = run_cli("central", "status", "--data-dir", str(p.central_dir), "--no-agents")
    finally:
        await p.stop()
    log = (tmp_path / "central.log").read_text()
    assert (False, True) == (status["nats"]["tls"], status["nats"]["plaintext_exposed"])
    assert (0, True) == (shown.returncode, "NATS IN CLEAR TEXT" in shown.stdout)
    assert "NATS IN CLEAR TEXT" in log
    assert not (p.central_dir / "pki").exists()


def test_the_private_ca_names_the_hosts_agents_use_and_is_kept_across_restarts(
    tmp_path: Path,
) -> None:
    """On 0.0.0.0 the server certificate names the machine (its name and its LAN address),
    nats.advertise's host, localhost and 127.0.0.1; a second start finds the CA and keeps it
    (stores' certificates stay good)."""
    cfg = central_config(
        tmp_path, "", **{"nats.urls": [], "nats.listen": "0.0.0.0:4222",
                         "nats.advertise": "tls://hq.example:4222"},
    )  # fmt: skip
    first = secure_broker(cfg).nats.tls
    ca = Path(first.ca).read_bytes()
    again = secure_broker(cfg).nats.tls
    cert = x509.load_pem_x509_certificate(Path(first.cert).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert {socket.gethostname(), "hq.example", "localhost"} <= dns and "127.0.0.1" in ips
    # The LAN address a store is given when it dials by address: the one this machine sends
    # from (here the test network's 192.0.2.x).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        lan = probe.getsockname()[0]
    assert lan in ips
    assert (True, first, ca) == (first.verify, again, Path(again.ca).read_bytes())
