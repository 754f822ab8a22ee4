"""Callers that keep calling criproxy from the host while systemd does something to it.

Each caller is a thread with one kind of call, looping until stopped, bounded in time and in count:
Version on a channel kept open (as the kubelet does), Version on a new channel per call (as crictl
does), ListContainers, and whole pod lifecycles (RunPodSandbox, StopPodSandbox, RemovePodSandbox).
Every call's outcome is kept with its start and end time (time.monotonic()).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from criproxy.api.runtime.v1 import api_pb2

MAX_SECONDS = 240.0
MAX_CALLS = 200_000
PAUSE_S = 0.005
# Reconnect quickly after a failure, so a kept-open channel's own back-off does not stretch the time
# its calls fail beyond the time criproxy is down.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                  ("grpc.max_reconnect_backoff_ms", 200)]


@dataclass(frozen=True)
class Outcome:
    caller: str
    started: float
    ended: float
    code: grpc.StatusCode  # OK for a success
    details: str = ""

    def __str__(self) -> str:
        return f"{self.caller} {self.started:.3f}-{self.ended:.3f}: {self.code.name} {self.details}"


def pod_config(name: str, log_directory: Path) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace="criproxy-systemd"),
        log_directory=str(log_directory),
        linux=api_pb2.LinuxPodSandboxConfig(security_context=api_pb2.LinuxSandboxSecurityContext(
            namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE))))


@dataclass
class Load:
    endpoint: str
    log_directory: Path
    kinds: tuple[str, ...] = ("version-kept", "version-new", "list-containers", "pods")
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        targets: dict[str, Callable[[], None]] = {
            "version-kept": self._version_kept, "version-new": self._version_new,
            "list-containers": self._list_containers, "pods": self._pods}
        self._threads = [threading.Thread(target=targets[kind], name=kind, daemon=True) for kind in self.kinds]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        assert not alive, f"callers still running 120 s after being stopped: {alive}"

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- results -------------------------------------------------------------------------------

    def ok(self, caller: str | None = None, after: float = 0.0) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.code == grpc.StatusCode.OK and o.started >= after
                       and (caller is None or o.caller == caller))

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.code != grpc.StatusCode.OK]

    def wait_for_calls(self, count: int, timeout: float = 30.0) -> None:
        """Until every caller has succeeded `count` times from now on (bounded)."""
        since = time.monotonic()
        deadline = since + timeout
        while any(self.ok(kind, since) < count for kind in self.kinds):
            assert time.monotonic() < deadline, (
                f"callers did not each make {count} calls within {timeout:.0f}s: "
                f"{ {kind: self.ok(kind, since) for kind in self.kinds} }; failures: {self.failures()[-5:]}")
            time.sleep(0.05)

    # -- callers -------------------------------------------------------------------------------

    def _record(self, caller: str, started: float, error: grpc.RpcError | None) -> None:
        ended = time.monotonic()
        if error is None:
            outcome = Outcome(caller, started, ended, grpc.StatusCode.OK)
        else:
            outcome = Outcome(caller, started, ended, error.code(), str(error.details()))
        with self._lock:
            self.outcomes.append(outcome)

    def _loop(self, caller: str, call: Callable[[], None]) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        for _ in range(MAX_CALLS):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            started = time.monotonic()
            try:
                call()
            except grpc.RpcError as error:
                self._record(caller, started, error)
            else:
                self._record(caller, started, None)
            self._stop.wait(PAUSE_S)

    def _channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.endpoint, options=FAST_RECONNECT)

    def _version_kept(self) -> None:
        with self._channel() as channel:
            version = channel.unary_unary("/runtime.v1.RuntimeService/Version")
            self._loop("version-kept", lambda: version(b"", timeout=10))

    def _version_new(self) -> None:
        def call() -> None:
            with grpc.insecure_channel(self.endpoint) as channel:
                channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=10)
        self._loop("version-new", call)

    def _list_containers(self) -> None:
        request = api_pb2.ListContainersRequest().SerializeToString()
        with self._channel() as channel:
            listing = channel.unary_unary("/runtime.v1.RuntimeService/ListContainers")
            self._loop("list-containers", lambda: listing(request, timeout=10))

    def _pods(self) -> None:
        with self._channel() as channel:
            def rpc(method: str, request: api_pb2.RunPodSandboxRequest | api_pb2.StopPodSandboxRequest
                    | api_pb2.RemovePodSandboxRequest) -> bytes:
                answer: bytes = channel.unary_unary(f"/runtime.v1.RuntimeService/{method}")(
                    request.SerializeToString(), timeout=60)
                return answer

            def lifecycle() -> None:
                config = pod_config(f"load-{uuid.uuid4().hex[:8]}", self.log_directory)
                answer = rpc("RunPodSandbox", api_pb2.RunPodSandboxRequest(config=config))
                pod_id = api_pb2.RunPodSandboxResponse.FromString(answer).pod_sandbox_id
                rpc("StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
                rpc("RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

            self._loop("pods", lifecycle)
