"""The listening socket: directory, mode, group, stale and live sockets, non-sockets, removal."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import grpc
import pytest

from criproxy.config import ServeConfig
from criproxy.errors import ConfigError
from criproxy.server import start_proxy
from criproxy.transport.endpoints import parse_endpoint
from tests.conftest import config_with
from tests.support.fakeruntime import FakeRuntime
from tests.support.loopthread import LoopThread


def test_creates_the_directory_and_sets_mode_0660(loop: LoopThread, fake: FakeRuntime,
                                                   proxy_config: ServeConfig) -> None:
    path = Path(proxy_config.listen.path)
    assert not path.parent.exists()
    proxy = loop.run(start_proxy(proxy_config))
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert not list(path.parent.glob("*.tmp")), "the temporary bind name was left behind"
    finally:
        loop.run(proxy.stop(0))
    assert not path.exists(), "the socket must be removed on stop"


def test_socket_group_and_mode_are_applied(loop: LoopThread, fake: FakeRuntime, proxy_config: ServeConfig) -> None:
    config = config_with(proxy_config, socket_group=12345, socket_mode=0o600)
    proxy = loop.run(start_proxy(config))
    try:
        st = os.lstat(config.listen.path)
        assert st.st_gid == 12345
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        loop.run(proxy.stop(0))


def test_a_stale_socket_is_replaced(loop: LoopThread, fake: FakeRuntime, proxy_config: ServeConfig) -> None:
    path = proxy_config.listen.path
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed proxy leaves
    proxy = loop.run(start_proxy(proxy_config))
    try:
        with grpc.insecure_channel(proxy_config.listen.target) as chan:
            assert chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5) == (
                b'\n\x050.1.0\x12\x0cfake-runtime\x1a\x051.2.3"\x02v1')  # the fake's VERSION_REPLY
    finally:
        loop.run(proxy.stop(0))


def test_a_live_socket_is_refused_and_left_alone(loop: LoopThread, fake: FakeRuntime,
                                                 proxy_config: ServeConfig) -> None:
    first = loop.run(start_proxy(proxy_config))
    try:
        inode = os.lstat(proxy_config.listen.path).st_ino
        with pytest.raises(ConfigError, match=r"another server is answering on this socket"):
            loop.run(start_proxy(proxy_config))
        assert os.lstat(proxy_config.listen.path).st_ino == inode
        with grpc.insecure_channel(proxy_config.listen.target) as chan:
            assert chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5) == (
                b'\n\x050.1.0\x12\x0cfake-runtime\x1a\x051.2.3"\x02v1')  # the fake's VERSION_REPLY
    finally:
        loop.run(first.stop(0))


def test_a_path_that_is_not_a_socket_is_an_error_naming_it(loop: LoopThread, fake: FakeRuntime,
                                                          proxy_config: ServeConfig) -> None:
    path = Path(proxy_config.listen.path)
    path.parent.mkdir()
    path.write_text("precious")
    with pytest.raises(ConfigError) as caught:
        loop.run(start_proxy(proxy_config))
    assert str(caught.value) == f"--listen {path}: exists and is not a socket; refusing to replace it (move it away)"
    assert path.read_text() == "precious"


def test_a_symlink_is_refused(loop: LoopThread, fake: FakeRuntime, proxy_config: ServeConfig, sockdir: Path) -> None:
    path = Path(proxy_config.listen.path)
    path.parent.mkdir()
    path.symlink_to(sockdir / "runtime.sock")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        loop.run(start_proxy(proxy_config))


def test_listening_on_the_runtime_socket_is_refused(loop: LoopThread, fake: FakeRuntime,
                                                    proxy_config: ServeConfig) -> None:
    assert proxy_config.runtime_endpoint is not None
    config = config_with(proxy_config, listen=parse_endpoint(proxy_config.runtime_endpoint.url, what="t"))
    with pytest.raises(ConfigError, match="is the proxy's own --listen socket"):
        loop.run(start_proxy(config))


def test_stop_leaves_a_successors_socket_in_place(loop: LoopThread, fake: FakeRuntime,
                                                 proxy_config: ServeConfig) -> None:
    proxy = loop.run(start_proxy(proxy_config))
    path = proxy_config.listen.path
    successor = socket.socket(socket.AF_UNIX)
    successor.bind(path + ".new")
    os.rename(path + ".new", path)  # what an upgrade does: a new socket renamed over the old
    try:
        loop.run(proxy.stop(0))
        assert stat.S_ISSOCK(os.lstat(path).st_mode), "the old proxy removed its successor's socket"
    finally:
        successor.close()
