"""How a storelink process talks to NATS: credentials file and TLS as nats-py options, and
publishing one message without nats-py's per-message costs (``hpub``, ``raw_sender``).

Shared by the agent and central so both read the same files the same way. A credentials file
is either an NKEY seed file (what ``storelink-central stores add`` writes: one line, ``SU...``)
or a NATS ``.creds`` file (user JWT + seed, from an operator-mode deployment); which one is told
by its content, so ``nats.credentials`` takes either.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

JWT_MARKER = b"BEGIN NATS USER JWT"
SEED_PREFIX = b"SU"


class CredentialsError(Exception):
    """A credentials or TLS file that cannot work. The message never contains the secret."""


def redact_url(url: str) -> str:
    """``url`` fit to show: a password (``nats://user:pass@host``) or a token
    (``nats://token@host``) in it becomes ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon and user else "***"
    return f"{scheme}://{shown}@{host}"


def credentials_options(path: str) -> dict[str, Any]:
    """nats-py ``connect`` options for the credentials file at ``path`` (empty: none)."""
    if not path:
        return {}
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials {path}: {exc.strerror}") from None
    if JWT_MARKER in content:
        return {"user_credentials": path}
    if content.strip().startswith(SEED_PREFIX):
        return {"nkeys_seed": path}
    raise CredentialsError(
        f"credentials {path} is neither an NKEY user seed (SU...) nor a NATS .creds file"
    )


def tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext | None:
    """A client TLS context trusting ``ca`` (else the system store), presenting ``cert``/``key``
    when given (mutual TLS); None when nothing TLS-related is configured."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise CredentialsError("TLS client certificate and key must be given together")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load TLS files: {exc}") from None
    return ctx


def connect_options(
    credentials: str = "", *, tls_ca: str = "", tls_cert: str = "", tls_key: str = ""
) -> dict[str, Any]:
    """Everything authentication-related to pass to ``nats.connect``."""
    options = credentials_options(credentials)
    ctx = tls_context(tls_ca, tls_cert, tls_key)
    if ctx is not None:
        options["tls"] = ctx
    return options


# --- publishing without nats-py's per-message costs -------------------------------------------
# nats-py's ``publish`` builds the header block from a dict per message (a regex per key, strip
# and translate per value), validates subjects we built ourselves and copies a large payload
# more than once. The agent's forwarder and central's nats sink build the same HPUB command
# themselves and queue it the way ``publish`` does, through two of nats-py's internals,
# ``_send_command`` and ``_flush_pending``; if a nats-py release drops them, ``raw_sender``
# says so (None) and the callers use ``publish``.


def hpub(subject: bytes, reply: bytes, header: bytes, payload: bytes) -> bytes:
    """The HPUB command for one message: ``header`` is its whole header block (``NATS/1.0``
    line, header lines, the blank line), in one allocation."""
    line = b"HPUB %s %s %d %d\r\n" % (subject, reply, len(header), len(header) + len(payload))
    return b"".join((line, header, payload, b"\r\n"))


def hpub_parts(subject: bytes, reply: bytes, header: bytes, parts: list[bytes], size: int) -> bytes:
    """``hpub`` of the payload ``b"".join(parts)`` (``size`` bytes: the caller knows it without
    adding up 500 records' lengths), joined once, here (``protocol.wire.raw_batch_parts``).
    Kept apart from ``hpub``, which central's nats sink calls per OMS record: handling both
    there cost it ~0.6 µs a record."""
    line = b"HPUB %s %s %d %d\r\n" % (subject, reply, len(header), len(header) + size)
    return b"".join((line, header, *parts, b"\r\n"))


def raw_sender(nc: Any) -> Any:
    """A coroutine function queuing one protocol command as ``nc.publish`` does, or None when
    this nats-py does not have the internals it needs."""
    send = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if send is None or flush is None or not hasattr(nc, "_flush_queue"):
        return None

    async def raw(command: bytes) -> None:
        await send(command)
        queue = nc._flush_queue
        if queue is not None and queue.empty():
            await flush()

    return raw
