"""The listening socket: safe creation, takeover rules, permissions and removal.

Notes:
- gRPC unlinks whatever sits at a unix path before it binds, so a second proxy would silently
  steal a live socket from the first. Before binding, the path is probed: a socket that
  accepts a connection is a live server and a refusal; one that refuses is stale and removed;
  anything that is not a socket is never touched.
- The socket is bound at a temporary name beside the final one, given its mode and group, and
  then renamed over the final path, so the kubelet never sees it with the wrong permissions.
- The same rename is the zero-downtime upgrade (--takeover): the path switches to the new
  process's socket atomically, so a connecting kubelet always finds a listener; the old
  process sees its path now names another socket, drains its in-flight calls and exits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

from criproxy.errors import ConfigError


def probe_socket(path: str, timeout: float = 1.0) -> bool:
    """True when something accepts connections at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as err:
            if err.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            raise
        return True


def prepare_listen_path(path: str, *, takeover: bool = False) -> bool:
    """Make the parent directory; refuse a non-socket; remove a stale socket; refuse a live socket
    unless `takeover` (an upgrade: the new socket will be renamed over it). True when a live server
    is being taken over."""
    target = Path(path)
    parent = target.parent
    try:
        parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--listen {path}: cannot create directory {parent}: {err.strerror}") from None
    if not parent.is_dir():
        raise ConfigError(f"--listen {path}: {parent} is not a directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"--listen {path}: is a symbolic link; refusing to serve through it (remove it)")
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--listen {path}: exists and is not a socket; refusing to replace it (move it away)")
    if probe_socket(path):
        if takeover:
            return True
        raise ConfigError(
            f"--listen {path}: another server is answering on this socket (a running criproxy?); "
            "stop it first, listen elsewhere, or replace it without downtime with --takeover"
        )
    os.unlink(path)
    return False


#: What temporary_path adds to a path at most: '.' + a pid of up to 7 digits (pid_max is 2**22) + '.tmp'.
TEMPORARY_SUFFIX_BYTES = len(".4194304.tmp")


def temporary_path(path: str) -> str:
    return f"{path}.{os.getpid()}.tmp"


def publish(temp: str, path: str, mode: int, group: int | None) -> int:
    """Give the bound socket its mode and group, then move it into place; return its inode."""
    os.chmod(temp, mode)
    if group is not None:
        os.chown(temp, -1, group)
    os.rename(temp, path)
    return os.lstat(path).st_ino


def remove_if_ours(path: str, inode: int) -> bool:
    """Remove the socket at `path` unless another process has replaced it since (an upgrade); True when removed."""
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
            return True
    return False
