"""Central's HTTP secure by default, from a running central over real HTTP: on loopback it
answers without a token; bound to all interfaces (0.0.0.0, reached here through 127.0.0.1)
status, metrics and the dashboard need a bearer token, or central refuses to start."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from central.broker import EmbeddedBroker, free_port
from central.config import HTTP_TOKEN_ENV, OPERATOR_TOKEN_ENV
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


async def _status_cli(data_dir: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """`storelink-central status --no-agents --json` as an operator's shell runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "central", "status", "--data-dir", str(data_dir), "--no-agents",
        "--json", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_status_cli_against_a_token_protected_central(
    tmp_path: Path, nats_server: EmbeddedBroker
) -> None:
    """`storelink-central status` asks the running central's /v1/status for what only the
    running process knows (sinks, held batches): bound to 0.0.0.0, without the token in the
    shell it says which variable to set and fails; with $STORELINK_HTTP_TOKEN (or the operator
    token) it shows central as running."""
    port = free_port()
    settings = {"http": f"0.0.0.0:{port}", "http_token": TOKEN}
    env = {k: v for k, v in os.environ.items() if k not in (HTTP_TOKEN_ENV, OPERATOR_TOKEN_ENV)}
    async with running_harness(
        tmp_path, nats_server.url, **settings, **{"dashboard.operator_token": OPERATOR}
    ) as h:
        data_dir = h.service.cfg.data_path
        code, _, err = await _status_cli(data_dir, env)
        refused = (code, f"wants a token: set ${HTTP_TOKEN_ENV}" in err)
        outcomes = {}
        for name, value in ((HTTP_TOKEN_ENV, TOKEN), (OPERATOR_TOKEN_ENV, OPERATOR)):
            code, out, err = await _status_cli(data_dir, {**env, name: value})
            outcomes[name] = (code, json.loads(out)["central_running"] if code == 0 else err)
    assert (1, True) == refused
    assert {HTTP_TOKEN_ENV: (0, True), OPERATOR_TOKEN_ENV: (0, True)} == outcomes
