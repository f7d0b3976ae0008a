"""systemd readiness notification (``sd_notify``) without a dependency.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a unix datagram socket, and waits for
``READY=1`` before it counts the service as started (so ``systemctl start`` returns only once
the agent answers HTTP) and takes ``STOPPING=1`` as "shutting down on purpose". The protocol is
newline-separated ``KEY=value`` lines in one datagram; that is all this module does.

Without the variable (run by hand, in tests, on Windows) every call is a no-op. A failure to
notify is logged and swallowed: the agent keeps running, and systemd's start timeout reports it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address systemd gave us, in the form ``socket.connect`` takes, or None.

    ``@name`` is a socket in the abstract namespace (a leading NUL byte); other non-path
    forms (``vsock:``) are not used for services and are ignored.
    """
    address = environ.get(NOTIFY_SOCKET_ENV, "")
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    return None


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=..."``) to systemd; True if sent."""
    address = notify_address(os.environ if environ is None else environ)
    unix = getattr(socket, "AF_UNIX", None)  # absent on Windows builds of older Pythons
    if address is None or unix is None:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(unix, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.replace("\0", "@"), exc)
        return False
    return True


def notify_ready(status: str) -> bool:
    """The service accepts requests: ``systemctl start`` may return."""
    return notify("READY=1", f"STATUS={status}")


def notify_stopping() -> bool:
    """A deliberate stop has begun (so a slow drain is not mistaken for a hang)."""
    return notify("STOPPING=1", "STATUS=stopping: finishing requests and batches in flight")
