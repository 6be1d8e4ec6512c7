"""systemd's readiness protocol (sd_notify), without libsystemd.

Owns sending state lines such as ``READY=1`` to ``$NOTIFY_SOCKET``, the
datagram socket systemd gives a ``Type=notify`` service. Outside systemd the
variable is unset and `notify` does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1"); True if a socket was there to take it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    # A leading "@" names a socket in the abstract namespace.
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc.strerror)
        return False
    return True
