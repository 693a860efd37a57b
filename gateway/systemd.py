"""systemd's readiness protocol (sd_notify), without a library: one datagram to $NOTIFY_SOCKET.

With `Type=notify` (deploy/mp169-gateway.service) systemd counts the gateway started when it sends
READY=1, which `mp169 run` does once it is connected to the broker with its store open, and
STOPPING=1 when it begins to drain. Outside systemd (no NOTIFY_SOCKET) nothing is sent.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from collections.abc import Mapping

log = structlog.get_logger("mp169.systemd")


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "STATUS=...") to the service manager; False if there is none.

    A failure to send is logged, never raised: the gateway runs the same without a manager.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    # "@name" is a socket in the abstract namespace (a leading NUL byte).
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd-notify-failed", socket=address, error=str(exc))
        return False
    return True
