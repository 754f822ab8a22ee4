"""Shared fixtures: a fake runtime and a proxy in front of it, each on its own unix socket."""

from __future__ import annotations

import os

# The same gRPC engine choice `criproxy serve` makes (criproxy.cli), before grpc is imported.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from criproxy.config import ServeConfig, build_config
from criproxy.server import Proxy, start_proxy
from criproxy.transport.endpoints import parse_endpoint
from tests.support.fakeruntime import FakeRuntime
from tests.support.loopthread import LoopThread


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths may not exceed 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="criproxy-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(loop: LoopThread, sockdir: Path) -> Iterator[FakeRuntime]:
    runtime = FakeRuntime()
    loop.run(runtime.start(str(sockdir / "runtime.sock")))
    yield runtime
    loop.run(runtime.stop())


@pytest.fixture
def proxy_config(sockdir: Path) -> ServeConfig:
    return ServeConfig(
        listen=parse_endpoint(f"unix://{sockdir}/proxy/criproxy.sock", what="test"),
        runtime_endpoint=parse_endpoint(f"unix://{sockdir}/runtime.sock", what="test"),
        shutdown_grace_seconds=1.0,
    )


@pytest.fixture
def proxy(loop: LoopThread, fake: FakeRuntime, proxy_config: ServeConfig) -> Iterator[Proxy]:
    running = loop.run(start_proxy(proxy_config))
    fake.journal.clear()  # forget the proxy's own start-up Version probe
    yield running
    loop.run(running.stop(0))


@pytest.fixture
def channel(proxy: Proxy) -> Iterator[grpc.Channel]:
    """A kubelet-side channel to the proxy (bytes in, bytes out)."""
    with grpc.insecure_channel(proxy.config.listen.target, options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)
    ]) as chan:
        yield chan


@pytest.fixture
def configured(loop: LoopThread, fake: FakeRuntime, sockdir: Path) -> Iterator[Callable[[str], Proxy]]:
    """Start proxies as `criproxy serve --config FILE` would, in front of the fake runtime: the YAML
    text given is appended to the socket settings (its journal starts empty)."""
    proxies: list[Proxy] = []

    def start(text: str = "") -> Proxy:
        path = sockdir / "criproxy.yaml"
        path.write_text(f"listen: unix://{sockdir}/proxy.sock\nruntime-endpoint: unix://{sockdir}/runtime.sock\n"
                        f"shutdown-grace-seconds: 0\nmetrics-address: 127.0.0.1:0\n{text}")
        proxy = loop.run(start_proxy(build_config({}, path)))
        proxies.append(proxy)
        fake.journal.clear()
        return proxy

    yield start
    for proxy in proxies:
        loop.run(proxy.stop(0))


def config_with(config: ServeConfig, **changes: object) -> ServeConfig:
    return replace(config, **changes)  # type: ignore[arg-type]
