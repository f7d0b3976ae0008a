"""protocol.connection: which credentials file is which, TLS file errors, URLs fit to show."""

from __future__ import annotations

from pathlib import Path

import pytest

from central.auth import new_user_seed, render_authorization, store_permissions
from protocol.connection import CredentialsError, connect_options, redact_url


def test_seed_file_and_creds_file_are_told_apart(tmp_path: Path) -> None:
    """An NKEY seed file is passed as nkeys_seed, a .creds file (JWT) as user_credentials;
    anything else is refused without echoing its content."""
    seed = tmp_path / "store.nk"
    seed.write_bytes(new_user_seed()[0] + b"\n")
    creds = tmp_path / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\neyJhbGciOi.fake.jwt\n------END NATS USER JWT------\n"
    )
    junk = tmp_path / "junk"
    junk.write_text("hunter2-not-a-seed")
    assert {"nkeys_seed": str(seed)} == connect_options(str(seed))
    assert {"user_credentials": str(creds)} == connect_options(str(creds))
    with pytest.raises(CredentialsError) as refused:
        connect_options(str(junk))
    assert "hunter2" not in str(refused.value) and str(junk) in str(refused.value)
    with pytest.raises(CredentialsError, match="cannot read credentials"):
        connect_options(str(tmp_path / "missing.nk"))
    assert {} == connect_options("")


def test_tls_files_must_load_and_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="must be given together"):
        connect_options(tls_cert=str(tmp_path / "c.pem"))
    with pytest.raises(CredentialsError, match="cannot load TLS files"):
        connect_options(tls_ca=str(tmp_path / "missing-ca.pem"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://user:s3cret@hq:4222", "nats://user:***@hq:4222"),
        ("tls://tok3n@hq:4222", "tls://***@hq:4222"),
        ("nats://:s3cret@hq", "nats://***@hq"),
        ("nats://hq:4222", "nats://hq:4222"),
    ],
)
def test_urls_are_shown_without_passwords_or_tokens(url: str, shown: str) -> None:
    assert shown == redact_url(url)


def test_authorization_lists_central_and_each_store_with_its_own_subjects() -> None:
    """The generated block names each store's key with permissions for that store only."""
    text = render_authorization("UCENTRAL", {"S1": "US1", "S2": "US2"})
    assert text.count('"nkey"') == 3
    s1 = store_permissions("S1")
    expected = ["storelink.events.S1", "storelink.heartbeat.S1", "storelink.checkpoint.S1"]
    assert expected == s1["publish"]["allow"]
    assert ["storelink.control.S1", "_INBOX_S1.>"] == s1["subscribe"]["allow"]


def test_no_reload_signal_means_no_signal_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is no SIGHUP (Windows), `stores add` must not touch the server's process:
    os.kill there terminates it. The new auth.conf waits for central's next start."""
    import os
    import signal
    import sys

    from central.auth import broker_dir, reload_broker
    from central.broker import PID_FILENAME

    broker_dir(tmp_path).mkdir(parents=True)
    (broker_dir(tmp_path) / PID_FILENAME).write_text(str(os.getpid()))

    def no_kill(pid: int, sig: int) -> None:
        raise AssertionError(f"os.kill({pid}, {sig}) called")

    monkeypatch.delattr(signal, "SIGHUP")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", no_kill)
    assert reload_broker(tmp_path, None) is False
