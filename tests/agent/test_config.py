"""agent.toml: the shared key names, defaults, clear errors, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import config
from agent.cli import cli
from agent.config import AgentConfig, field_help, load_config
from agent.errors import ConfigError

# The schema central's `stores add` writes (common brief); both sides must use these names.
SHARED_KEYS = {
    "store_id",
    "data_dir",
    "ingest.listen",
    "ingest.token",
    "ingest.max_request_bytes",
    "ingest.max_requests_in_flight",
    "nats.urls",
    "nats.credentials",
    "nats.tls_ca",
    "nats.tls_cert",
    "nats.tls_key",
    "nats.ping_interval",
    "forwarder.batch_max_records",
    "forwarder.batch_max_bytes",
    "forwarder.linger_ms",
    "forwarder.inflight",
    "forwarder.publish_timeout",
    "forwarder.compression",
    "outbox.retention_days",
    "outbox.max_buffer_bytes",
    "outbox.loop_commit_ms",
    "poslog.drop_dir",
    "poslog.poll_interval",
    "poslog.timezone",
    "poslog.currency",
    "poslog.weight_unit",
    "reconcile.interval",
    "reconcile.days",
    "reconcile.till_grace",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_keys_are_exactly_the_shared_schema() -> None:
    """The config has exactly the keys central writes, each with help text."""
    helps = field_help()
    assert SHARED_KEYS == set(helps)
    assert [] == [key for key, text in helps.items() if not text]


def test_only_store_id_is_required_and_defaults_hold(tmp_path: Path) -> None:
    """A file with just store_id gets every documented default."""
    cfg = load_config(write(tmp_path, 'store_id = "S1"\n'))
    assert (
        "S1",
        config.DEFAULT_LISTEN,
        "",
        config.DEFAULT_MAX_REQUEST_BYTES,
        config.DEFAULT_MAX_REQUESTS_IN_FLIGHT,
        config.DEFAULT_NATS_URLS,
        config.DEFAULT_PING_INTERVAL,
        config.DEFAULT_BATCH_MAX_RECORDS,
        config.DEFAULT_BATCH_MAX_BYTES,
        config.DEFAULT_LINGER_MS,
        config.DEFAULT_INFLIGHT,
        config.DEFAULT_PUBLISH_TIMEOUT,
        config.DEFAULT_RETENTION_DAYS,
        config.DEFAULT_MAX_BUFFER_BYTES,
        "",
        config.DEFAULT_POLL_INTERVAL,
    ) == (
        cfg.store_id,
        cfg.ingest.listen,
        cfg.ingest.token,
        cfg.ingest.max_request_bytes,
        cfg.ingest.max_requests_in_flight,
        cfg.nats.urls,
        cfg.nats.ping_interval,
        cfg.forwarder.batch_max_records,
        cfg.forwarder.batch_max_bytes,
        cfg.forwarder.linger_ms,
        cfg.forwarder.inflight,
        cfg.forwarder.publish_timeout,
        cfg.outbox.retention_days,
        cfg.outbox.max_buffer_bytes,
        cfg.poslog.drop_dir,
        cfg.poslog.poll_interval,
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('store_id = "S1"\ncolour = "red"\n', "colour"),
        ('store_id = "S1"\n[forwarder]\ninflite = 3\n', "inflite"),
        ('store_id = "S1"\n[forwarder]\ninflight = 0\n', "forwarder.inflight"),
        ('store_id = "S1"\n[outbox]\nloop_commit_ms = -1\n', "outbox.loop_commit_ms"),
        ('store_id = "S1"\n[outbox]\nloop_commit_ms = "fast"\n', "outbox.loop_commit_ms"),
        ('store_id = "S.1"\n', "store_id"),
        ("[ingest]\n", "store_id"),
        ('store_id = "S1"\n[ingest]\nlisten = "8787"\n', "listen"),
        ('store_id = "S1"\nstore_id = "S2"\n', "TOML"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, text: str, named: str) -> None:
    """A bad config raises ConfigError naming the file and the offending key."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert path == error.value.path
    assert named in str(error.value)


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    """data_dir, drop_dir and credentials are taken relative to the config's directory."""
    cfg = load_config(
        write(
            tmp_path,
            'store_id = "S1"\ndata_dir = "data"\n[nats]\ncredentials = "s1.creds"\n'
            '[poslog]\ndrop_dir = "drop"\n',
        )
    )
    root = tmp_path.resolve()
    assert (str(root / "data"), str(root / "s1.creds"), str(root / "drop")) == (
        cfg.data_dir,
        cfg.nats.credentials,
        cfg.poslog.drop_dir,
    )


def test_token_from_the_environment_allows_an_open_listen(tmp_path: Path) -> None:
    """$STORELINK_AGENT_TOKEN overrides ingest.token, so a LAN listen address is accepted."""
    path = write(tmp_path, 'store_id = "S1"\ndata_dir = "data"\n[ingest]\nlisten = "0.0.0.0:9"\n')
    without = CliRunner().invoke(cli, ["check-config", str(path)], env={config.TOKEN_ENV: ""})
    with_token = CliRunner().invoke(
        cli, ["check-config", str(path)], env={config.TOKEN_ENV: "t0ken"}
    )
    assert (1, 0) == (without.exit_code, with_token.exit_code)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is reported as such."""
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "nope.toml")
    assert "cannot read" in str(error.value)


def test_struct_is_frozen() -> None:
    """The config cannot be changed after loading."""
    cfg = AgentConfig(store_id="S1")
    with pytest.raises(AttributeError):
        cfg.store_id = "S2"  # type: ignore[misc]


@pytest.mark.parametrize("token", [" t0ken", "t0ken ", "tök", "two words", "tab\there"])
def test_a_token_no_pos_could_send_is_refused_by_name(tmp_path: Path, token: str) -> None:
    """A token with spaces or characters beyond printable ASCII could never be matched (every
    request would be refused 401): the config file and $STORELINK_AGENT_TOKEN are refused at
    start, naming where the token came from."""
    with pytest.raises(ConfigError, match=r"`ingest\.token`: the ingest token must be printable"):
        config.config_from_dict({"store_id": "S1", "ingest": {"token": token}})
    path = write(tmp_path, 'store_id = "S1"\ndata_dir = "data"\n')
    done = CliRunner().invoke(cli, ["check-config", str(path)], env={config.TOKEN_ENV: token})
    assert 1 == done.exit_code
    assert f"${config.TOKEN_ENV}: the ingest token must be printable ASCII" in done.output
    ok = config.config_from_dict({"store_id": "S1", "ingest": {"token": "A-z_0.9~+/="}})
    assert "A-z_0.9~+/=" == ok.ingest.token
