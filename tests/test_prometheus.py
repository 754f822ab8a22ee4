"""A real Prometheus (Debian's `prometheus`) scrapes a running proxy; PromQL over its HTTP API sees the
calls this test made. Everything on loopback; the Prometheus process and its storage end with the test."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from criproxy.server import Proxy
from tests.support.tools import tool

CALLS = 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, binary: str, directory: Path, target: str) -> None:
        self.port = free_port()
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "criproxy", "scrape_interval": "500ms", "scrape_timeout": "400ms",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = directory / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return 0, b""

    def wait_ready(self, deadline: float) -> None:
        while self.get("/-/ready")[0] != 200:
            assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"prometheus not ready: {self.log.read_text()[-2000:]}"
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict[str, object]]:
        status, body = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prometheus_binary() -> str:
    return tool("prometheus", "prometheus")


@pytest.fixture
def scraped(prometheus_binary: str, configured: Callable[[str], Proxy],
            tmp_path: Path) -> Iterator[tuple[Proxy, Prometheus]]:
    proxy = configured("")
    assert proxy.observability is not None and proxy.observability.http is not None
    server = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{proxy.observability.http.port}")
    try:
        yield proxy, server
    finally:
        server.stop()
    assert server.proc.returncode is not None


def value(result: list[dict[str, object]]) -> float:
    assert len(result) == 1, result
    sample = result[0]["value"]
    assert isinstance(sample, list)
    return float(sample[1])


@pytest.mark.timeout(60)
def test_prometheus_scrapes_the_calls_the_proxy_served(scraped: tuple[Proxy, Prometheus]) -> None:
    began = time.monotonic()
    proxy, server = scraped
    server.wait_ready(began + 15)
    with grpc.insecure_channel(proxy.config.listen.target) as chan:
        for _ in range(CALLS):
            # A failed call counts as well: this test is about the series reaching Prometheus, not forwarding.
            with contextlib.suppress(grpc.RpcError):
                chan.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)
    query = 'sum(criproxy_calls_total{job="criproxy", method="RuntimeService/Version"})'
    deadline = began + 25
    while True:
        result = server.query(query)
        if result and value(result) == CALLS:
            break
        assert time.monotonic() < deadline, f"{query} = {result} after {time.monotonic() - began:.1f} s, " \
                                            f"expected {CALLS}"
        time.sleep(0.25)
    assert value(server.query('up{job="criproxy"}')) == 1
    codes = server.query('sum by (code) (criproxy_calls_total{method="RuntimeService/Version"})')
    assert sum(float(r["value"][1]) for r in codes) == CALLS  # type: ignore[index]
    assert value(server.query('criproxy_runtime_up{role="runtime"}')) == 1
    assert time.monotonic() - began < 30
