"""Central's HTTP secure by default, from a running central over real HTTP: on loopback it
answers without a token; bound to all interfaces (0.0.0.0, reached here through 127.0.0.1)
status, metrics and the dashboard need a bearer token, or central refuses to start."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import pytest

from central.broker import EmbeddedBroker, free_port
from central.errors import ConfigError
from central.service import CentralService
from tests.central.conftest import central_config, running_harness

TOKEN = "read-token-for-tests"
OPERATOR = "operator-token-for-tests"
GUARDED = ("/v1/status", "/metrics", "/", "/.json")


async def statuses(port: int, headers: dict[str, str] | None = None) -> dict[str, int]:
    """The HTTP status of each guarded path and /healthz, asked through 127.0.0.1."""
    found = {}
    async with aiohttp.ClientSession(headers=headers) as http:
        for path in (*GUARDED, "/healthz"):
            async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                found[path] = resp.status
    return found


async def test_on_loopback_everything_answers_without_a_token(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """Bound to 127.0.0.1 with no token set, status, metrics and the dashboard answer 200."""
    port = free_port()
    async with running_harness(tmp_path, nats_server.url, http=f"127.0.0.1:{port}"):
        assert dict.fromkeys((*GUARDED, "/healthz"), 200) == await statuses(port)


async def test_on_all_interfaces_a_token_is_needed(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """Bound to 0.0.0.0: no token or a wrong one gets 401 (a Basic challenge for browsers)
    everywhere but /healthz; the http token (Bearer, or as Basic password) and the operator
    token get 200."""
    port = free_port()
    settings = {"http": f"0.0.0.0:{port}", "http_token": TOKEN}
    async with running_harness(
        tmp_path, nats_server.url, **settings, **{"dashboard.operator_token": OPERATOR}
    ):
        basic = base64.b64encode(f"hq:{TOKEN}".encode()).decode()
        found = {
            "none": await statuses(port),
            "wrong": await statuses(port, {"Authorization": "Bearer nope"}),
            "bearer": await statuses(port, {"Authorization": f"Bearer {TOKEN}"}),
            "basic": await statuses(port, {"Authorization": f"Basic {basic}"}),
            "operator": await statuses(port, {"Authorization": f"Bearer {OPERATOR}"}),
        }
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as resp:
            challenges = resp.headers.getall("WWW-Authenticate")
    refused = {**dict.fromkeys(GUARDED, 401), "/healthz": 200}
    allowed = dict.fromkeys((*GUARDED, "/healthz"), 200)
    assert {
        "none": refused,
        "wrong": refused,
        "bearer": allowed,
        "basic": allowed,
        "operator": allowed,
    } == found
    # A browser asks a person for the token on the Basic challenge.
    assert ['Basic realm="storelink-central"', 'Bearer realm="storelink-central"'] == challenges


def test_on_all_interfaces_without_a_token_central_refuses_to_start(tmp_path: Path) -> None:
    """Bound to 0.0.0.0 with no token set, central does not start: it says how to fix it."""
    cfg = central_config(tmp_path, "nats://127.0.0.1:1", http=f"0.0.0.0:{free_port()}")
    with pytest.raises(ConfigError, match="no token is set: set http_token"):
        CentralService(cfg)
