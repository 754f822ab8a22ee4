"""systemd's readiness protocol (sd_notify), written here: one datagram to $NOTIFY_SOCKET.

The protocol is a few lines; the python-systemd bindings need libsystemd headers to build,
which nodes do not have. Without NOTIFY_SOCKET (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `READY=1`, `STOPPING=1`, `MAINPID=…`, `STATUS=…` lines; True when systemd got them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as err:
        log.warning("cannot notify systemd at %s: %s", address, err)
        return False
    return True
