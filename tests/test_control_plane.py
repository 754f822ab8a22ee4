"""The control plane never stalls, never lies: logging off the loop, a private decision log, a metrics
endpoint that stops at once and shares its port only on a takeover, a runtime that does not answer said
so until it does, and supervised background tasks."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from criproxy.config import ServeConfig
from criproxy.cri.context import CREATE_CONTAINER, CallContext, PodInfo
from criproxy.errors import ConfigError
from criproxy.observe.decisionlog import DecisionLog
from criproxy.policies import Decision
from criproxy.server import Proxy, start_proxy
from criproxy.transport.endpoints import parse_endpoint
from tests.conftest import config_with
from tests.support.fakeruntime import FakeRuntime
from tests.support.loopthread import LoopThread

CTX = CallContext(method=CREATE_CONTAINER, pod=PodInfo("ns", "web", "u1"), container="app", request=None)  # type: ignore[arg-type]
DECISION = Decision(action="applied", rule="r", mode="enforce", setting="memory-limit")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metrics_port(proxy: Proxy) -> int:
    assert proxy.observability is not None and proxy.observability.http is not None
    return proxy.observability.http.port


def sample(text: str, line_start: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else -1.0


# ------------------------------------------------------------------ 1. nothing blocks the event loop

class Stalled(logging.Handler):
    """A log destination that stops taking lines until released (a full pipe, a stuck journald)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.gate.wait(5)
        self.lines.append(record.getMessage())


class StalledStream:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.text: list[str] = []

    def write(self, text: str) -> int:
        self.gate.wait(5)
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        return None


@pytest.fixture
def restored_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_a_stalled_main_log_never_blocks_a_caller_drops_and_counts(restored_root_logging: None) -> None:
    from criproxy.cli import configure_logging

    stream = StalledStream()
    background = configure_logging("INFO", stream=stream, capacity=50)
    drops: list[tuple[str, int]] = []
    background.on_drop = lambda log, n: drops.append((log, n))
    log = logging.getLogger("criproxy.test.stalled")
    began = time.monotonic()
    for i in range(500):
        log.info("line %d", i)
    assert time.monotonic() - began < 1.0, "logging waited for a stalled stderr"
    assert background.dropped >= 500 - 51
    assert sum(n for _, n in drops) == background.dropped and {name for name, _ in drops} == {"main"}
    stream.gate.set()
    background.stop()  # flushes what was queued before it
    written = "".join(stream.text)
    assert written.count("criproxy.test.stalled: line ") == 500 - background.dropped
    assert "INFO criproxy.test.stalled: line 0" in written


def test_main_log_is_flushed_on_stop(restored_root_logging: None) -> None:
    from criproxy.cli import configure_logging

    stream = StalledStream()
    stream.gate.set()
    background = configure_logging("INFO", stream=stream)
    for i in range(200):
        logging.getLogger("criproxy.test.flush").warning("before stop %d", i)
    background.stop()
    assert "".join(stream.text).count("before stop") == 200


def test_a_stalled_decision_log_never_blocks_a_call(tmp_path: Path) -> None:
    dl = DecisionLog(tmp_path / "decisions.log", capacity=20)
    stalled = Stalled()
    dl.handler.emit = stalled.emit  # type: ignore[method-assign]
    dropped: list[int] = []
    dl.on_drop = lambda log, n: dropped.append(n)
    began = time.monotonic()
    for _ in range(300):
        dl(CTX, [DECISION])
    assert time.monotonic() - began < 1.0, "a decision waited for the decision log's file"
    assert dl.dropped >= 300 - 21 and sum(dropped) == dl.dropped
    stalled.gate.set()
    dl.close()
    assert len(stalled.lines) == 300 - dl.dropped


def test_decision_log_writes_everything_before_close_and_drops_are_metrics(loop: LoopThread, fake: FakeRuntime,
                                                                             proxy_config: ServeConfig,
                                                                             tmp_path: Path) -> None:
    from criproxy.observe.logqueue import DEFAULT_CAPACITY
    from criproxy.server import build_observability

    config = config_with(proxy_config, decision_log=tmp_path / "d.log", metrics_address=("127.0.0.1", 0))
    obs = build_observability(config, CollectorRegistry(), None)
    assert obs.decision_log is not None
    for _ in range(100):
        obs.decision_log(CTX, [DECISION])
    obs.decision_log.close()
    assert len((tmp_path / "d.log").read_text().splitlines()) == 100

    obs = build_observability(config_with(config, decision_log=tmp_path / "e.log"), CollectorRegistry(), None)
    assert obs.decision_log is not None
    stalled = Stalled()
    obs.decision_log.handler.emit = stalled.emit  # type: ignore[method-assign]
    for _ in range(DEFAULT_CAPACITY + 100):
        obs.decision_log(CTX, [DECISION])
    from prometheus_client import generate_latest

    registry = obs.metrics.registry  # type: ignore[attr-defined]
    text = generate_latest(registry).decode()
    assert sample(text, 'criproxy_log_records_dropped_total{log="decisions"}') >= 99
    assert sample(text, 'criproxy_log_records_dropped_total{log="main"}') == 0
    stalled.gate.set()
    obs.close()


def test_serve_logs_its_last_line_after_sigterm(sockdir: Path, fake: FakeRuntime) -> None:
    import signal
    import subprocess
    import sys

    from criproxy.transport import tuning
    from tests.support.proxyproc import ROOT

    sock = sockdir / "p.sock"
    proc = subprocess.Popen([sys.executable, "-m", "criproxy", "serve", "--listen", f"unix://{sock}",
                             "--runtime-endpoint", f"unix://{sockdir}/runtime.sock", "--metrics-address", "off",
                             "--log-level", "debug"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "criproxy did not bind its socket"
            time.sleep(0.05)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        lines = proc.stderr.read().rstrip().splitlines()
        assert lines[-1].endswith(f"stopped; removed {sock}")
        if tuning.glibc_version() is not None:  # once serving, start-up's free heap went back to the kernel
            assert any("start-up memory handed back: resident" in line for line in lines), lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------ 2. the decision log is private

def test_decision_log_and_its_rotations_are_created_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        dl = DecisionLog(tmp_path / "logs" / "decisions.log", max_bytes=2000, backups=2)
        for _ in range(40):
            dl(CTX, [DECISION])
        dl.close()
    finally:
        os.umask(old)
    files = sorted((tmp_path / "logs").iterdir())
    assert [f.name for f in files] == ["decisions.log", "decisions.log.1", "decisions.log.2"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f.name} is {stat.S_IMODE(f.stat().st_mode):04o}"


# ------------------------------------------------------------------ 3. the HTTP endpoint stops at once

def test_http_endpoint_stops_at_once_and_lets_a_request_in_flight_finish() -> None:
    from criproxy.metrics.prometheus import HttpEndpoint, health_app

    http = HttpEndpoint("127.0.0.1", 0, health_app(CollectorRegistry(), lambda: (True, "ready")))
    http.start()
    client = socket.create_connection(("127.0.0.1", http.port), timeout=5)
    try:
        client.sendall(b"GET /healthz HTTP/1.0\r\n")  # the request is in flight: the server waits for the rest
        time.sleep(0.3)
        stopper = threading.Thread(target=http.stop)
        began = time.monotonic()
        stopper.start()
        stopper.join(3)
        took = time.monotonic() - began
        assert not stopper.is_alive(), "stop() waited for a request in flight to end"
        assert took < 0.1, f"stop() took {took:.3f} s"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", http.port), timeout=1).close()
        client.sendall(b"\r\n")
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.0 200 OK") and reply.endswith(b"ok\n")
    finally:
        client.close()


def test_an_idle_http_endpoint_does_not_wake_up() -> None:
    from criproxy.metrics.prometheus import HttpEndpoint, health_app

    http = HttpEndpoint("127.0.0.1", 0, health_app(CollectorRegistry(), lambda: (True, "ready")))
    http.start()
    try:
        assert http.thread.native_id is not None

        def wakes() -> int:
            with open(f"/proc/self/task/{http.thread.native_id}/status", encoding="ascii") as status:
                return int(next(line for line in status if line.startswith("voluntary_ctxt_switches")).split()[1])

        time.sleep(0.2)
        before = wakes()
        time.sleep(1.0)
        # Waking to poll takes the GIL from the event loop each time (it was 20 times a second).
        assert wakes() - before <= 2
    finally:
        http.stop()


# ------------------------------------------------------------------ 4. the metrics port is shared only on a takeover

def test_a_second_proxy_on_the_same_metrics_address_is_refused(loop: LoopThread, fake: FakeRuntime,
                                                               proxy_config: ServeConfig, sockdir: Path) -> None:
    first = loop.run(start_proxy(config_with(proxy_config, metrics_address=("127.0.0.1", 0)),
                                 registry=CollectorRegistry()))
    try:
        port = metrics_port(first)
        other = config_with(proxy_config, listen=parse_endpoint(f"unix://{sockdir}/other.sock", what="test"),
                            metrics_address=("127.0.0.1", port))
        with pytest.raises(ConfigError) as caught:
            loop.run(start_proxy(other, registry=CollectorRegistry()))
        assert str(caught.value) == f"--metrics-address 127.0.0.1:{port}: cannot listen: Address already in use"
        assert not os.path.exists(f"{sockdir}/other.sock")
    finally:
        loop.run(first.stop(0))


def test_a_takeover_shares_the_metrics_port_with_the_proxy_it_replaces(loop: LoopThread, fake: FakeRuntime,
                                                                       proxy_config: ServeConfig) -> None:
    old = loop.run(start_proxy(config_with(proxy_config, metrics_address=("127.0.0.1", 0)),
                               registry=CollectorRegistry()))
    new: Proxy | None = None
    stopped = False
    try:
        port = metrics_port(old)
        new = loop.run(start_proxy(config_with(proxy_config, metrics_address=("127.0.0.1", port), takeover=True),
                                   registry=CollectorRegistry()))
        assert metrics_port(new) == port
        loop.run(old.stop(0))
        stopped = True
        assert http_get(port, "/healthz") == (200, "ok\n")  # the successor answers alone now
    finally:
        if new is not None:
            loop.run(new.stop(0))
        if not stopped:
            loop.run(old.stop(0))


# ------------------------------------------------------------------ 7. a runtime that does not answer, said so

def test_a_runtime_that_does_not_answer_is_said_at_start_and_until_it_answers(
        loop: LoopThread, proxy_config: ServeConfig, sockdir: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import criproxy.transport.upstream

    monkeypatch.setattr(criproxy.transport.upstream, "NOT_ANSWERING_REPEAT_S", 1.0)
    caplog.set_level(logging.INFO, logger="criproxy")
    hint = f"runtime endpoint unix://{sockdir}/runtime.sock is not answering (is the runtime running?)"

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if hint in r.getMessage()]

    proxy = loop.run(start_proxy(proxy_config))
    fake: FakeRuntime | None = None
    try:
        assert len(said()) == 1 and said()[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
        time.sleep(2.4)
        assert 2 <= len(said()) <= 4, f"said {len(said())} times in 2.4 s at most once a second"
        fake = FakeRuntime()
        loop.run(fake.start(str(sockdir / "runtime.sock")))
        deadline = time.monotonic() + 5
        while not proxy.runtime.is_connected():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        count = len(said())
        time.sleep(1.5)
        assert len(said()) == count, "still said after the runtime answered"
    finally:
        loop.run(proxy.stop(0))
        if fake is not None:
            loop.run(fake.stop())


# ------------------------------------------------------------------ 8. background work is supervised

def test_supervisor_logs_counts_restarts_and_reports_a_failing_task(caplog: pytest.LogCaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import criproxy.supervise
    from criproxy.supervise import Supervisor

    monkeypatch.setattr(criproxy.supervise, "HEALTHY_AFTER_S", 0.5)
    failures: list[str] = []
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 2:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.sleep(3600)

    async def scenario() -> tuple[dict[str, str], dict[str, str], int]:
        supervisor = Supervisor(on_failure=failures.append)
        task = supervisor.start("flaky", flaky)
        await asyncio.sleep(0.05)
        during = supervisor.failing()
        while len(runs) < 3:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.7)
        after = supervisor.failing()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return during, after, len(runs)

    during, after, count = asyncio.run(scenario())
    assert "flaky" in during and "RuntimeError: boom 1" in during["flaky"]
    assert after == {}
    assert count == 3 and failures == ["flaky", "flaky"]
    assert runs[2] - runs[1] > runs[1] - runs[0] > 0.05, "restarts back off"
    logged = [r for r in caplog.records if r.name == "criproxy.supervise" and r.levelno == logging.ERROR]
    assert len(logged) == 2 and logged[0].exc_info is not None and "flaky" in logged[0].getMessage()


def test_stopping_background_tasks_never_hangs_on_one_that_keeps_its_cancellation(
        caplog: pytest.LogCaptureFixture) -> None:
    from criproxy.supervise import stop_tasks

    async def obeys() -> None:
        await asyncio.sleep(60)

    async def fails() -> None:
        raise RuntimeError("failed before the stop")

    released = False

    async def stubborn() -> None:  # what a task that lost its cancellation looks like from outside
        while not released:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async def scenario() -> tuple[float, float, list[bool]]:
        good = [asyncio.create_task(obeys(), name="obeys"), asyncio.create_task(fails(), name="fails")]
        await asyncio.sleep(0.01)
        began = time.monotonic()
        await stop_tasks([*good, None], "test owner", wait=5.0)
        quick = time.monotonic() - began
        bad = asyncio.create_task(stubborn(), name="stubborn")
        await asyncio.sleep(0.01)
        nonlocal released
        try:
            began = time.monotonic()
            async with asyncio.timeout(5):  # a hang fails the test instead
                await stop_tasks([bad], "test owner", wait=0.3)
            bounded = time.monotonic() - began
            still = [bad.done()]
        finally:
            released = True  # the test's own clean-up
            await bad
        return quick, bounded, still

    with caplog.at_level(logging.ERROR, logger="criproxy.supervise"):
        quick, bounded, still = asyncio.run(scenario())
    assert quick < 1.0, "tasks that obey their cancellation are waited for, not the whole bound"
    assert 0.3 <= bounded < 1.5 and still == [False]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("test owner: background task stubborn did not end within"), errors[0]


def test_the_runtime_watcher_survives_an_exception(loop: LoopThread, fake: FakeRuntime,
                                                   configured: Callable[[str], Proxy], sockdir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import criproxy.supervise

    monkeypatch.setattr(criproxy.supervise, "HEALTHY_AFTER_S", 1.0)
    proxy = configured("")
    port = metrics_port(proxy)
    original = proxy.runtime.on_state_change
    assert original is not None
    raised: list[bool] = []

    def once(upstream: Any, state: Any) -> None:
        if not raised:
            raised.append(True)
            raise RuntimeError("bug in a state listener")
        original(upstream, state)

    proxy.runtime.on_state_change = once
    loop.run(fake.stop())
    deadline = time.monotonic() + 5
    while not raised:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, text = http_get(port, "/readyz")
    assert status == 503 and "watch-runtime" in text, text
    loop.run(fake.start(str(sockdir / "runtime.sock")))
    deadline = time.monotonic() + 10
    while sample(http_get(port, "/metrics")[1], 'criproxy_runtime_up{role="runtime"}') != 1:
        assert time.monotonic() < deadline, "the watcher did not come back to see the runtime return"
        time.sleep(0.05)
    text = http_get(port, "/metrics")[1]
    assert sample(text, 'criproxy_background_task_failures_total{task="watch-runtime"}') == 1
    deadline = time.monotonic() + 5
    while http_get(port, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, http_get(port, "/readyz")
        time.sleep(0.05)
