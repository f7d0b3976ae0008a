"""Secrets never appear in logs, status output or error messages.

A real ``python -m agent run`` with an ingest token and NATS credentials (an NKEY seed file,
or a .creds file with a user JWT and the seed) against a real nats-server; requests with wrong
tokens; ``status``, ``status --json`` and ``check-config`` while it runs and after it stops;
then every byte the processes wrote is searched for the token, the seed and the JWT. The
secrets are random, so a hit can only be a leak."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing
import nkeys
import pytest

from central.broker import EmbeddedBroker, free_port
from central.demo import ManagedProcess
from protocol.logformat import REDACTED, add_secret, configure_logging, redact
from tests.agent.conftest import STORE, body, sales

CLI_TIMEOUT = 60.0


def new_seed() -> str:
    """A fresh NKEY user seed: ``SU`` + 56 base32 characters."""
    raw = bytes(nacl.signing.SigningKey.generate())
    seed: bytes = nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def fake_jwt() -> str:
    """Shaped like a user JWT (the server here has no auth: it is never verified)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(b'{"typ":"JWT","alg":"ed25519-nkey"}')
    claims = part(json.dumps({"jti": secrets.token_hex(16), "sub": "U" + "A" * 55}).encode())
    return f"{header}.{claims}.{part(secrets.token_bytes(64))}"


def creds_file(jwt: str, seed: str) -> str:
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n"
    )


@dataclass
class Agent:
    """One store agent's files, and everything it and its CLI printed."""

    root: Path
    port: int
    env: dict[str, str]
    secrets: dict[str, str]
    config: Path = field(init=False)
    output: list[tuple[str, str]] = field(default_factory=list)  # (what, text)

    def __post_init__(self) -> None:
        self.config = self.root / "agent.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "agent", *args],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
            env=self.env,
        )
        what = "storelink-agent " + " ".join(args)
        self.output += [(f"{what} (stdout)", done.stdout), (f"{what} (stderr)", done.stderr)]
        return done

    def request(
        self, method: str, path: str, *, token: str | None, data: bytes | None = None
    ) -> tuple[int, str]:
        """(HTTP status, body) of one request, recording the body as output."""
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        self.output.append((f"{method} {path} -> {status}", text))
        return status, text

    def leaks(self) -> list[str]:
        """Where a secret shows up: "<secret name> in <what>"."""
        found = []
        for what, text in self.output:
            for name, value in self.secrets.items():
                if value in text:
                    found.append(f"{name} in {what}")
        return found


async def exercise(agent: Agent, log_args: list[str], token: str) -> None:
    """Run the agent, make it work and refuse, ask it how it is, stop it, ask again."""
    log_path = agent.root / "agent.log"
    process = ManagedProcess(
        "agent",
        [sys.executable, "-m", "agent", "run", "--config", str(agent.config), *log_args],
        agent.url + "/healthz",
        log_path,
    )
    # ManagedProcess passes our environment on: the token-from-environment case needs it.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(agent.env)
    try:
        await process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        # Let the forwarder connect (or fail to) and log about it.
        await asyncio.sleep(1.0)
        wrong = [token + "x", token[:-1], "", "not-the-token", token.upper()]
        for attempt in wrong:
            for method, path, data in (
                ("POST", "/v1/events", body(*sales("w", 2))),
                ("GET", "/v1/status", None),
                ("POST", "/v1/resync", b'{"all": true}'),
            ):
                status, _ = await asyncio.to_thread(
                    agent.request, method, path, token=attempt, data=data
                )
                assert 401 == status, (attempt, method, path)
        await asyncio.to_thread(
            agent.request, "POST", "/v1/events", token=None, data=body(*sales("n", 1))
        )
        # Accepted, refused as invalid, and a resync: lines the agent logs.
        ok, _ = await asyncio.to_thread(
            agent.request, "POST", "/v1/events", token=token, data=body(*sales("g", 3))
        )
        bad, _ = await asyncio.to_thread(
            agent.request, "POST", "/v1/events", token=token, data=b'{"type": "nonsense"}'
        )
        resync, _ = await asyncio.to_thread(
            agent.request, "POST", "/v1/resync", token=token, data=b'{"all": true}'
        )
        assert (202, 200) == (ok, resync)
        assert 400 <= bad < 500
        for args in (["status"], ["status", "--json"]):
            done = await asyncio.to_thread(
                agent.cli, *args, "--config", str(agent.config), "--sample", "0"
            )
            assert 0 == done.returncode, done.stderr
        done = await asyncio.to_thread(agent.cli, "check-config", str(agent.config))
        assert 0 == done.returncode, done.stderr
    finally:
        code = await process.stop()
    assert 0 == code, process.tail()
    for args in (["status"], ["status", "--json"]):
        done = await asyncio.to_thread(agent.cli, *args, "--config", str(agent.config))
        assert 0 == done.returncode, done.stderr
    await asyncio.to_thread(agent.cli, "check-config", str(agent.config))
    await asyncio.to_thread(agent.cli, "check-config", "--offline", str(agent.config))
    agent.output.append(("the agent's log", log_path.read_text(errors="replace")))


def make_agent(
    tmp_path: Path, nats_url: str, *, creds: str, token_in: str, seed: str, jwt: str | None
) -> tuple[Agent, str]:
    token = "tok-" + secrets.token_urlsafe(24)
    credentials = tmp_path / "store.creds"
    credentials.write_text(creds)
    credentials.chmod(0o600)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("STORELINK_AGENT_TOKEN", None)
    config_token = token
    if token_in == "env":
        env["STORELINK_AGENT_TOKEN"] = token
        config_token = ""
    found = {"ingest token": token, "nkey seed": seed}
    if jwt is not None:
        found["user JWT"] = jwt
    agent = Agent(root=tmp_path, port=port, env=env, secrets=found)
    agent.config.write_text(
        f'store_id = "{STORE}"\n'
        'data_dir = "data"\n'
        f'[ingest]\nlisten = "127.0.0.1:{port}"\ntoken = "{config_token}"\n'
        f'[nats]\nurls = ["{nats_url}"]\ncredentials = "{credentials}"\n'
    )
    return agent, token


@pytest.mark.parametrize(
    ("kind", "token_in", "log_args"),
    [
        ("seed file", "config", ["--log-level", "debug"]),
        ("creds file", "env", ["--log-level", "debug", "--log-format", "text"]),
    ],
)
async def test_no_secret_in_any_output(
    tmp_path: Path, nats_server: EmbeddedBroker, kind: str, token_in: str, log_args: list[str]
) -> None:
    """Neither the ingest token nor the NKEY seed (nor the JWT) appears in the agent's log, its
    HTTP answers, or anything `status`, `status --json` or `check-config` print."""
    seed = new_seed()
    jwt = fake_jwt() if kind == "creds file" else None
    creds = creds_file(jwt, seed) if jwt is not None else seed + "\n"
    agent, token = make_agent(
        tmp_path, nats_server.url, creds=creds, token_in=token_in, seed=seed, jwt=jwt
    )
    await exercise(agent, log_args, token)
    log_text = dict(agent.output)["the agent's log"]
    assert "storelink-agent stopped" in log_text  # it did log, all the way to the end
    assert [] == agent.leaks()


def test_the_log_masks_secrets_whatever_logs_them() -> None:
    """The last line of defence: a seed, a JWT, a bearer credential, a URL password or a
    registered token is masked even when code logs it outright (message, extra, traceback)."""
    seed, jwt, token = new_seed(), fake_jwt(), "tok-" + secrets.token_urlsafe(24)
    add_secret(token)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    lines = []
    try:
        for fmt in ("json", "text"):
            stream = io.StringIO()
            configure_logging("debug", fmt, stream=stream)
            log = logging.getLogger("tests.security")
            log.info("seed %s jwt %s", seed, jwt, extra={"creds": seed})
            log.warning("Authorization: Bearer %s, url nats://store:hunter22@hq:4222", token)
            try:
                raise ValueError(f"bad token {token!r}")
            except ValueError:
                log.exception("failed")
            lines.append(stream.getvalue())
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = "\n".join(lines)
    assert [] == [s for s in (seed, jwt, token, "hunter22") if s in text]
    assert REDACTED in text
    assert "nats://[redacted]@hq:4222" in text


def test_each_side_masks_the_secrets_in_its_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent's log masks $STORELINK_AGENT_TOKEN; central's masks $STORELINK_WEBHOOK_SECRET,
    its HTTP and operator tokens (and the agent's token, as it always has)."""
    import agent.logs
    import central.logs

    token, hmac_secret = "tok-" + secrets.token_urlsafe(24), "whs-" + secrets.token_urlsafe(24)
    monkeypatch.setenv("STORELINK_AGENT_TOKEN", token)
    monkeypatch.setenv("STORELINK_WEBHOOK_SECRET", hmac_secret)
    http_token, operator = "htk-" + secrets.token_urlsafe(24), "otk-" + secrets.token_urlsafe(24)
    monkeypatch.setenv("STORELINK_HTTP_TOKEN", http_token)
    monkeypatch.setenv("STORELINK_OPERATOR_TOKEN", operator)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out: dict[str, str] = {}
    try:
        for side, configure in (
            ("agent", agent.logs.configure_logging),
            ("central", central.logs.configure_logging),
        ):
            configure("info", "text")
            logging.getLogger("tests.security").info(
                "token %s secret %s http %s operator %s", token, hmac_secret, http_token, operator
            )
            out[side] = capsys.readouterr().out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert f"token {REDACTED} secret" in out["agent"]
    assert (
        f"token {REDACTED} secret {REDACTED} http {REDACTED} operator {REDACTED}" in out["central"]
    )


def test_redaction_leaves_ordinary_lines_alone() -> None:
    """Messages the agent logs every day are not mangled."""
    for line in (
        "refusing 3 events: missing or wrong bearer token",
        "forwarder connected to 127.0.0.1:4222",
        "NATS at nats://127.0.0.1:4222 does not accept this agent",
        "new outbox for store S001, epoch 9f3a6c1d2b7e4a50",
        'WWW-Authenticate: Bearer realm="storelink-agent"',
    ):
        assert line == redact(line)


def test_a_password_in_a_nats_url_is_not_shown_by_status(tmp_path: Path) -> None:
    """`status` (here reading the database: the service is down) masks a URL's password."""
    from click.testing import CliRunner

    from agent.cli import cli
    from agent.outbox import Outbox

    async def make_outbox() -> None:
        box = Outbox(tmp_path / "data", store_id=STORE, max_buffer_bytes=1 << 30, retention_days=7)
        await box.open()
        await box.close()

    asyncio.run(make_outbox())
    password = "pw-" + secrets.token_urlsafe(16)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'store_id = "{STORE}"\ndata_dir = "data"\n'
        f'[ingest]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[nats]\nurls = ["nats://store:{password}@127.0.0.1:1"]\n'
    )
    runner = CliRunner()
    outputs = [
        runner.invoke(cli, ["status", "--config", str(config), *args]).output
        for args in ([], ["--json"])
    ]
    assert [] == [out for out in outputs if password in out]
