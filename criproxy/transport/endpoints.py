"""CRI endpoint URLs as the kubelet and crictl write them (unix:///path/to.sock)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from criproxy.errors import ConfigError

#: The sockets tried, in order, when no --runtime-endpoint is given: containerd's, then CRI-O's.
WELL_KNOWN_RUNTIME_ENDPOINTS = (
    "unix:///run/containerd/containerd.sock",
    "unix:///run/crio/crio.sock",
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A unix-socket endpoint: the URL a user wrote and the absolute socket path it names."""

    url: str
    path: str

    @property
    def target(self) -> str:
        """The gRPC channel target for this socket."""
        return "unix://" + self.path

    def __str__(self) -> str:
        return self.url


#: The longest path a unix socket address holds: sun_path is 108 bytes, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def parse_endpoint(value: str, *, what: str, reserve: tuple[int, str] | None = None) -> Endpoint:
    """Parse `unix:///abs/path` (or a bare absolute path); `what` names the flag in errors.

    A path longer than the kernel takes in a socket address is refused here, before anything binds or
    connects; `reserve` is (bytes, what they are for) that a caller adds to the path (--listen binds a
    temporary name beside it first)."""
    raw = value.strip()
    if raw.startswith("unix://"):
        path = raw[len("unix://") :]
    elif raw.startswith("/"):
        path, raw = raw, "unix://" + raw
    else:
        scheme = raw.split("://", 1)[0] + "://" if "://" in raw else ""
        hint = f"the {scheme} scheme is not supported; " if scheme else ""
        raise ConfigError(
            f"{what} {value!r}: {hint}expected a unix socket URL such as unix:///run/containerd/containerd.sock"
        )
    if not path.startswith("/"):
        raise ConfigError(
            f"{what} {value!r}: the socket path must be absolute (unix:///abs/path has three slashes)"
        )
    if "\x00" in path:
        raise ConfigError(f"{what} {value!r}: the socket path contains a NUL byte")
    path = os.path.normpath(path)
    length = len(os.fsencode(path))
    extra, why = reserve if reserve is not None else (0, "")
    if length + extra > MAX_SOCKET_PATH_BYTES:
        limit = f"the kernel allows at most {MAX_SOCKET_PATH_BYTES} bytes in a unix socket path"
        if extra:
            limit += f", and {why} ({extra} bytes more): use at most {MAX_SOCKET_PATH_BYTES - extra}"
        raise ConfigError(f"{what} {value!r}: the socket path is {length} bytes long; {limit}")
    return Endpoint(url=raw, path=path)
