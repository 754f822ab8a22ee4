"""After a real pod lifecycle through the proxy, its per-method counts are the calls that were made."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from tests.support.containerd import Containerd
from tests.support.cri import DEFAULT_TIMEOUT, CriClient, Metadata, Service
from tests.support.pods import container_state, pod_config, remove_pod, run_pod, runtime, sleeper_config, wait_for
from tests.support.proxyproc import ProxyProcess

pytestmark = pytest.mark.containerd


@pytest.fixture
def counted(containerd: Containerd, tmp_path: Path) -> Iterator[ProxyProcess]:
    with ProxyProcess(tmp_path / "p.sock", "--runtime-endpoint", containerd.endpoint,
                      log=tmp_path / "criproxy.log") as running:
        yield running


class CountingClient(CriClient):
    """A CRI client that remembers how many calls of each method it made."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.made: Counter[str] = Counter()

    def call(self, service: Service, name: str, request: Message, *, timeout: float = DEFAULT_TIMEOUT,
             metadata: Metadata = ()) -> Message:
        self.made[f"{service}/{name}"] += 1
        return super().call(service, name, request, timeout=timeout, metadata=metadata)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^criproxy_calls_total\{code="OK",method="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def test_per_method_counts_match_the_calls_made(counted: ProxyProcess, containerd: Containerd,
                                                tmp_path: Path) -> None:
    before = scrape(counted.metrics_url())  # the proxy's own start-up calls go upstream, not through it
    client = CountingClient(counted.endpoint)
    try:
        config = pod_config("counted", tmp_path)
        pod_id = run_pod(client, config)
        create = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, sandbox_config=config,
                                                config=sleeper_config(containerd.busybox_image))
        container_id = runtime(client, "CreateContainer", create).container_id
        runtime(client, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
        wait_for("the container to run", lambda: container_state(client, container_id) == api_pb2.CONTAINER_RUNNING)
        runtime(client, "ExecSync", api_pb2.ExecSyncRequest(container_id=container_id, cmd=["true"], timeout=10))
        remove_pod(client, pod_id)
        after = scrape(counted.metrics_url())
    finally:
        client.close()
    counts = {method: after.get(method, 0) - before.get(method, 0) for method in set(after) | set(before)}
    assert {m: n for m, n in counts.items() if n} == dict(client.made)
    assert client.made["RuntimeService/ContainerStatus"] >= 1 and client.made["RuntimeService/RunPodSandbox"] == 1
