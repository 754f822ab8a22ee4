"""Forwarding benchmark: criproxy side by side with a direct connection to the same runtime, in one run.

    python bench/forwarding.py [--quick] [--json OUT] [--grpc-experiments VALUE ...] [--scenario NAME ...]
    python bench/forwarding.py --containerd [--quick]    # in front of a private, real containerd (root)

Four kinds of process, all on loopback unix sockets in a temporary directory:

1. a fast fake runtime (bench/fake_runtime.py: pre-serialized answers), or with --containerd a
   private containerd (tests/support/containerd.py) with a few pods,
2. the proxy, started as `python -m criproxy serve` in front of it (one per variant and setup),
3. reference relays in front of the same runtime: a naive grpc.aio proxy (bench/naive_proxy.py)
   and a byte-copy relay (bench/splice_relay.c, compiled with gcc at bench time),
4. this process, the client: synchronous gRPC with raw bytes, as the kubelet would call.

Each scenario measures the same call direct, through every proxy variant and through every
reference in interleaved blocks (so drift, CPU frequency and noisy neighbours hit all alike),
after a warm-up, and reports p50/p99, ratios, each relay process's CPU per call (utime+stime
from /proc/PID/stat) and its RSS. Targets print PASS or MISS; nothing here fails a test suite.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: GRPC_EXPERIMENTS as this benchmark was started with: what a proxy variant "inherit" gets.
ORIGINAL_GRPC_EXPERIMENTS = os.environ.get("GRPC_EXPERIMENTS")
#: The harness (this client and the fake runtime) keeps one engine setting for every variant:
#: the environment's, else criproxy's own default, so only the proxy changes between variants.
HARNESS_GRPC_EXPERIMENTS = os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
# The repository's criproxy package, whether or not it is installed.
sys.path.insert(0, ROOT)

import grpc  # noqa: E402  (after GRPC_EXPERIMENTS is settled)

from criproxy.api.runtime.v1 import api_pb2  # noqa: E402

MiB = 1024 * 1024
MAX_MESSAGE_BYTES = 64 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
CALL_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0
MESSAGES_METADATA = "x-bench-messages"  # bench/fake_runtime.py streams this many messages
#: glibc gives freed memory at the top of the heap back to the kernel and faults fresh pages in on the
#: next large message (~300 page faults per 1 MB answer received, doubling a sync client's CPU). A Go
#: kubelet does not pay that, so the harness keeps a 16 MiB pad (M_TOP_PAD) for a stable, fair baseline.
HARNESS_TOP_PAD = 16 << 20
_M_TOP_PAD = -2
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]  # main() adds the --client-authority options before any channel is made
#: The :authority the client sends (--client-authority): name -> its channel options.
CLIENT_AUTHORITIES: dict[str, list[tuple[str, Any]]] = {
    # grpc-go, and so the kubelet, sends `localhost` to a unix socket: the proxy takes the connection as it is.
    "kubelet": [("grpc.default_authority", "localhost")],
    # grpcio's own default, the percent-encoded socket path: h2 refuses it, so the proxy re-encodes every
    # header block of such a connection (native/src/authority.rs). What Python tools calling the proxy cost it.
    "grpcio": [],
}
Metadata = tuple[tuple[str, str], ...]
#: A variant's pseudo-variable naming the source tree its proxy runs from (--proxy-tree); it is also
#: passed to the proxy's environment, where nothing reads it.
PROXY_TREE_KEY = "CRIPROXY_BENCH_TREE"
_started = time.monotonic()


def tune_harness_malloc() -> bool:
    """mallopt(M_TOP_PAD) in this process; False where there is no glibc."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_TOP_PAD, HARNESS_TOP_PAD))
    except (OSError, AttributeError):
        return False


def progress(text: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes


#: Runs first in every child: ask for SIGKILL when the benchmark dies, however it dies
#: (PR_SET_PDEATHSIG survives exec), then become the real program under the same pid.
#: (A preexec_fn would do the same, but is unsafe once gRPC's threads are running.)
_LAUNCHER = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 9)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Process:
    """A process the benchmark measures by pid: CPU and memory counters from /proc, its log's tail."""

    def __init__(self, name: str, pid: int, log_path: Path) -> None:
        self.name = name
        self.pid = pid
        self.log_path = log_path

    def alive(self) -> bool:
        return os.path.exists(f"/proc/{self.pid}")

    def cpu_seconds(self) -> float:
        """utime+stime of every thread of the process, from /proc/PID/stat."""
        return proc_cpu_seconds(self.pid)

    def stat(self) -> tuple[float, int]:
        return proc_stat(self.pid)

    def sample(self) -> CpuSample:
        return cpu_sample(self.pid)

    def status_kib(self, key: str) -> int:
        return proc_status_kib(self.pid, key)

    def fd_count(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """Nothing: whoever started it stops it."""


class Child(Process):
    """A subprocess of the benchmark: its log file, CPU and memory counters, and a bounded stop."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path,
                 cwd: str = ROOT) -> None:
        self._log = log_path.open("wb")
        launcher = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        self.proc = subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)
        super().__init__(name, self.proc.pid, log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; never raises."""
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        with contextlib.suppress(Exception):
            self._log.close()


def proc_stat(pid: int | str) -> tuple[float, int]:
    """(utime+stime in seconds, minor page faults) of every thread of the process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields[0] is field 3 of proc(5)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[7])  # 14 utime, 15 stime, 10 minflt


def proc_cpu_seconds(pid: int | str) -> float:
    return proc_stat(pid)[0]


@dataclass(frozen=True)
class CpuSample:
    """A process's CPU time at one moment: utime+stime (clock ticks, the whole process, exited threads
    included), minor page faults, and every live thread's run time in ns (/proc/PID/task/TID/schedstat)."""

    ticks_s: float
    faults: int
    threads_ns: dict[str, int]
    #: Every live thread's time spent runnable but waiting for a CPU, in ns (schedstat's second field).
    threads_wait_ns: dict[str, int] = field(default_factory=dict)

    def seconds_until(self, later: CpuSample) -> float:
        """CPU seconds spent between this sample and a later one: ns-exact from schedstat when every thread
        of this sample is still there (an exited thread's run time would be lost), else utime+stime, whose
        10 ms resolution needs many calls."""
        if self.threads_ns and later.threads_ns and self.threads_ns.keys() <= later.threads_ns.keys():
            return (sum(later.threads_ns.values()) - sum(self.threads_ns.values())) / 1e9
        return later.ticks_s - self.ticks_s

    def wait_seconds_until(self, later: CpuSample) -> float | None:
        """Seconds the threads spent waiting for a CPU between this sample and a later one; None when a
        thread exited meanwhile (its wait would be lost) or there is no schedstat."""
        before, after = self.threads_wait_ns, later.threads_wait_ns
        if before and after and before.keys() <= after.keys():
            return (sum(after.values()) - sum(before.values())) / 1e9
        return None


def cpu_sample(pid: int | str) -> CpuSample:
    ticks, faults = proc_stat(pid)
    threads: dict[str, int] = {}
    waits: dict[str, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait = f.read().split()[:2]
            threads[tid], waits[tid] = int(run), int(wait)
        except (OSError, ValueError):  # the thread just exited, or no schedstat: ticks only
            return CpuSample(ticks, faults, {})
    return CpuSample(ticks, faults, threads, waits)


def proc_status_kib(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def wait_answering(target: str, child: Process, timeout: float = START_TIMEOUT_S) -> None:
    """Until the socket exists and a Version call on it answers (bounded); raise with the child's log."""
    path = target[len("unix://"):]
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if not child.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} did not create {path}:\n{child.log_tail()}")
        time.sleep(0.02)
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        version = channel.unary_unary(VERSION_PATH, None, None)
        while True:
            try:
                version(VERSION_REQUEST, timeout=2.0, wait_for_ready=True)
                return
            except grpc.RpcError as err:
                if not child.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} does not answer Version ({err}):\n{child.log_tail()}") from None
                time.sleep(0.05)


def compile_relay(workdir: Path) -> tuple[str | None, str]:
    """bench/splice_relay.c built with `gcc -O2` into workdir (once: both byte-copy references run it):
    (binary, "") or (None, why not)."""
    binary = workdir / "splice_relay"
    if binary.exists():
        return str(binary), ""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None, "gcc is not installed (needed to build bench/splice_relay.c)"
    try:
        built = subprocess.run([gcc, "-O2", "-o", str(binary), os.path.join(ROOT, "bench", "splice_relay.c")],
                               capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"gcc failed: {err}"
    if built.returncode != 0:
        return None, f"gcc failed ({built.returncode}): {built.stderr.strip()[-500:]}"
    return str(binary), ""


def populate_containerd(channel: grpc.Channel, image: str, logs: Path, pods: int, deadline: float) -> tuple[int, int]:
    """Host-network pods (a running pause sandbox each) with two created containers each, labelled as the
    kubelet labels them, so ListContainers has something to list; stops early at the deadline."""
    run_pod = channel.unary_unary("/runtime.v1.RuntimeService/RunPodSandbox", None, None)
    create = channel.unary_unary(CREATE_CONTAINER_PATH, None, None)
    host = api_pb2.NamespaceOption(network=api_pb2.NODE)
    made_pods = made_containers = 0
    for i in range(pods):
        if time.monotonic() > deadline:
            progress(f"containerd: populating stopped at the deadline after {made_pods} pods")
            break
        name, uid = f"bench-{i}", f"00000000-0000-4000-8000-{i:012d}"
        labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "bench",
                  "io.kubernetes.pod.uid": uid}
        sandbox = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace="bench"), labels=labels,
            annotations={"kubernetes.io/config.source": "api", "kubernetes.io/config.seen": "2025-01-01T00:00:00Z"},
            log_directory=str(logs / name),
            linux=api_pb2.LinuxPodSandboxConfig(
                security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=host)))
        reply = run_pod(api_pb2.RunPodSandboxRequest(config=sandbox).SerializeToString(), timeout=60.0)
        pod_id = api_pb2.RunPodSandboxResponse.FromString(reply).pod_sandbox_id
        made_pods += 1
        for container in ("app", "sidecar"):
            config = api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name=container), image=api_pb2.ImageSpec(image=image),
                command=["/bin/sleep", "3600"], log_path=f"{container}.log",
                labels={**labels, "io.kubernetes.container.name": container},
                annotations={"io.kubernetes.container.hash": f"{i:08x}", "io.kubernetes.container.restartCount": "0",
                             "io.kubernetes.container.terminationMessagePath": "/dev/termination-log"},
                linux=api_pb2.LinuxContainerConfig(
                    security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=host)))
            request = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox)
            create(request.SerializeToString(), timeout=60.0)
            made_containers += 1
    return made_pods, made_containers


# ---------------------------------------------------------------------------------------------
# What is measured


VERSION_PATH = "/runtime.v1.RuntimeService/Version"
VERSION_REQUEST = api_pb2.VersionRequest(version="v1").SerializeToString()
LIST_CONTAINERS_PATH = "/runtime.v1.RuntimeService/ListContainers"
LIST_CONTAINERS_REQUEST = api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter()).SerializeToString()
EVENTS_PATH = "/runtime.v1.RuntimeService/GetContainerEvents"
EVENTS_REQUEST = api_pb2.GetEventsRequest().SerializeToString()
CREATE_CONTAINER_PATH = "/runtime.v1.RuntimeService/CreateContainer"
STATUS_PATH = "/runtime.v1.RuntimeService/Status"
STATUS_REQUEST = api_pb2.StatusRequest().SerializeToString()
LIST_IMAGES_PATH = "/runtime.v1.ImageService/ListImages"
LIST_IMAGES_REQUEST = api_pb2.ListImagesRequest().SerializeToString()
#: Every interceptor, in the default order, named explicitly (a config file's `interceptors:` list).
ALL_INTERCEPTORS_YAML = "interceptors: [runtime-handler, seccomp, resources]\n"


def create_container_request() -> bytes:
    """An annotated CreateContainer: bench/overhead.py's request plus a seccomp profile and a runtime
    handler. The resources interceptor tightens the CPU quota and the memory and swap limits, seccomp
    sets the profile (runtime-handler runs on RunPodSandbox only, so it passes this call on untouched)."""
    from bench.overhead import create_request

    request = api_pb2.CreateContainerRequest.FromString(create_request())
    request.sandbox_config.annotations.update({"seccomp-profile.criproxy.io/pod": "runtime/default",
                                               "runtime-handler.criproxy.io/pod": "runc"})
    return request.SerializeToString()


#: The reference relays, measured in the same run as the proxy: name -> what it stands for.
REFERENCES: dict[str, str] = {
    "naive-grpcio": "a naive grpc.aio raw-bytes proxy (bench/naive_proxy.py): what gRPC alone costs a grpc.aio proxy",
    "byte-copy": "a byte-copy relay (bench/splice_relay.c, epoll + splice): the floor of any man in the middle",
    "read-copy": ("the same relay with --copy (read/write through a 64 KiB buffer): the floor of a relay that "
                  "holds the bytes, as any relay that parses HTTP/2 must"),
}
NAIVE, BYTE_COPY, READ_COPY = "naive-grpcio", "byte-copy", "read-copy"
#: Every reference's CPU per call beside the proxy's, as figures without a target.
REFERENCES_CPU: tuple[tuple[str, float | None], ...] = tuple((name, None) for name in REFERENCES)


@dataclass(frozen=True)
class ProxySetup:
    """How a proxy is started for a scenario: extra `serve` flags and an optional --config file body."""

    args: tuple[str, ...] = ()
    config_yaml: str | None = None

    def describe(self) -> str:
        parts = list(self.args) + (["--config <file>"] if self.config_yaml is not None else [])
        return " ".join(parts) or "plain"


PLAIN = ProxySetup()


@dataclass(frozen=True)
class Variant:
    """A proxy environment to compare: variables set for the proxy process on top of the benchmark's own.

    GRPC_EXPERIMENTS is the benchmark's own as it was started (usually unset, so criproxy applies
    its default) unless the variant sets it.
    """

    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v!r}" for k, v in self.overrides) or "inherit"

    @property
    def tree(self) -> str:
        """The source tree the proxy runs from: this repository, or a copy given with --proxy-tree."""
        return dict(self.overrides).get(PROXY_TREE_KEY, ROOT)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.tree, env.get("PYTHONPATH", "")) if p)
        if ORIGINAL_GRPC_EXPERIMENTS is None:
            env.pop("GRPC_EXPERIMENTS", None)  # set by this script for the harness only
        else:
            env["GRPC_EXPERIMENTS"] = ORIGINAL_GRPC_EXPERIMENTS
        env.update(self.overrides)
        return env

    def experiments(self) -> str | None:
        """The proxy's GRPC_EXPERIMENTS; None: unset, criproxy applies its default."""
        return self.env().get("GRPC_EXPERIMENTS")

    def effective(self) -> str:
        value = self.experiments()
        if value is None:
            return "GRPC_EXPERIMENTS unset: criproxy's default applies"
        return f"GRPC_EXPERIMENTS={value!r}" + (": gRPC's built-in defaults" if not value else "")

    @classmethod
    def for_experiments(cls, value: str) -> Variant:
        """--grpc-experiments: 'inherit', 'none' (empty: gRPC's built-in defaults) or a literal value."""
        if value == "inherit":
            return cls()
        return cls((("GRPC_EXPERIMENTS", "" if value == "none" else value),))

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """--proxy-env-variant: 'KEY=VALUE [KEY=VALUE ...]'."""
        overrides = []
        for word in shlex.split(spec):
            key, sep, value = word.partition("=")
            if not sep or not key:
                raise ValueError(f"expected KEY=VALUE, got {word!r}")
            overrides.append((key, value))
        return cls(tuple(overrides))


@dataclass
class Target:
    """One way to reach the runtime: direct, or through one proxy process."""

    label: str
    address: str
    channel: grpc.Channel
    variant: Variant | None = None  # None: direct or a reference
    proxy: Process | None = None  # the relaying process: a proxy variant's or a reference's
    reference: str | None = None  # a name in REFERENCES

    @property
    def is_proxy(self) -> bool:
        """A criproxy variant, whose figures are checked against the targets (references are not)."""
        return self.variant is not None


@dataclass
class Check:
    """One target of the issue: a figure against its limit."""

    name: str
    value: float
    limit: float
    unit: str
    at_most: bool = True  # False: the value must be at least the limit

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def verdict(self) -> str:
        if math.isnan(self.value):
            return "ERROR"
        if self.passed:
            return "PASS"
        off = (self.value / self.limit - 1) if self.at_most else (1 - self.value / self.limit)
        return f"MISS by {off * 100:.0f}%"

    def target_text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {fmt_value(self.limit, self.unit)}"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "unit": self.unit,
                "at_most": self.at_most, "verdict": self.verdict()}


@dataclass
class Row:
    """One line of the printed table."""

    metric: str
    direct: str = ""
    proxy: str = ""
    ratio: str = ""
    check: Check | None = None
    note: str = ""  # the result column when there is no check (e.g. why a comparison was skipped)


@dataclass
class VariantResult:
    """What one scenario found for one proxy variant."""

    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if row.check is not None:
            self.checks.append(row.check)


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "us":
        return f"{value / 1000:.2f} ms" if value >= 10_000 else f"{value:.0f} µs"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "msg/s":
        return f"{value:,.0f}/s"
    return f"{value:g} {unit}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# ---------------------------------------------------------------------------------------------
# The harness


@dataclass
class Options:
    quick: bool
    variants: list[Variant]
    containers: int
    clients: int
    references: list[str] = field(default_factory=lambda: list(REFERENCES))
    containerd: bool = False  # a private real containerd instead of the fake runtime
    containerd_pods: int = 10
    client_authority: str = "kubelet"  # a key of CLIENT_AUTHORITIES


class Bench:
    """The running harness: temp dir, fake runtime, proxies (started on first use) and channels."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.children: list[Child] = []
        self._channels: list[grpc.Channel] = []
        self._proxies: dict[tuple[Variant, ProxySetup], Target] = {}
        self._references: dict[str, Target] = {}
        self._failed: dict[object, str] = {}  # proxy (variant, setup) or reference name -> why it did not start
        #: References that could not be run here (e.g. no gcc for byte-copy): name -> why.
        self.skipped_references: dict[str, str] = {}
        self.runtime_address = f"unix://{workdir}/runtime.sock"
        self.runtime: Process | None = None
        self.direct: Target | None = None
        self.proxy_starts: list[dict[str, Any]] = []
        self.containerd: Any = None  # tests.support.containerd.Containerd with --containerd
        self.runtime_description = ""

    def scale(self, full: int, minimum: int = 1) -> int:
        """A count for this mode: full as given, --quick a quarter of it (at least `minimum`)."""
        return full if not self.options.quick else max(minimum, full // 4)

    def budget(self, full_seconds: float) -> float:
        return full_seconds if not self.options.quick else full_seconds / 4

    def channel(self, address: str, extra: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        channel = grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, *extra])
        self._channels.append(channel)
        return channel

    def start_runtime(self) -> None:
        if self.options.containerd:
            self.start_containerd()
            return
        env = dict(os.environ)
        env.setdefault("GLIBC_TUNABLES", f"glibc.malloc.top_pad={HARNESS_TOP_PAD}")
        argv = [sys.executable, os.path.join(ROOT, "bench", "fake_runtime.py"), "--listen",
                self.runtime_address[len("unix://"):], "--containers", str(self.options.containers)]
        self.runtime = Child("fake runtime", argv, env, self.workdir / "runtime.log")
        self.children.append(self.runtime)
        wait_answering(self.runtime_address, self.runtime)
        self.direct = Target("direct", self.runtime_address, self.channel(self.runtime_address))
        self.runtime_description = (f"fake runtime (bench/fake_runtime.py), ListContainers answers "
                                    f"{self.options.containers} containers")

    def start_containerd(self) -> None:
        """A private containerd in the work directory (the e2e suite's machinery), with a few pods."""
        from tests.support.containerd import Containerd, containerd_available

        reason = containerd_available()
        if reason is not None:
            raise RuntimeError(f"cannot run a real containerd: {reason}")
        daemon = Containerd(self.workdir / "ctrd", start_timeout=60.0)
        self.containerd = daemon  # stopped by close(), whatever happens next
        daemon.start()
        pid = daemon._process.pid  # the daemon's process; CPU per call is read from /proc like any other
        self.runtime = Process("containerd", pid, daemon.log_path)
        self.runtime_address = daemon.endpoint
        self.direct = Target("direct", self.runtime_address, self.channel(self.runtime_address))
        pods, containers = populate_containerd(self.direct.channel, daemon.busybox_image, self.workdir / "pods",
                                               self.options.containerd_pods, deadline=time.monotonic() + 60.0)
        version = api_pb2.VersionResponse.FromString(
            self.direct.channel.unary_unary(VERSION_PATH, None, None)(VERSION_REQUEST, timeout=CALL_TIMEOUT_S))
        self.runtime_description = (f"private containerd {version.runtime_version} (pid {pid}) with {pods} pods and "
                                    f"{containers} containers (created, not started)")
        progress(f"{self.runtime_description} up")

    def proxy(self, variant: Variant, setup: ProxySetup) -> Target:
        """The proxy for this variant and setup, started (and waited for) on first use."""
        key = (variant, setup)
        if key in self._proxies:
            return self._proxies[key]
        if key in self._failed:
            raise RuntimeError(self._failed[key])
        index = len(self._proxies) + len(self._failed)
        directory = self.workdir / f"proxy{index}"
        address = f"unix://{directory}/criproxy.sock"
        argv = [sys.executable, "-m", "criproxy", "serve", "--listen", address,
                "--runtime-endpoint", self.runtime_address, "--shutdown-grace-seconds", "1", *setup.args]
        if "--metrics-address" not in setup.args:
            # Metrics stay on, as by default, but each proxy needs a port of its own.
            argv += ["--metrics-address", "127.0.0.1:0"]
        if setup.config_yaml is not None:
            config = self.workdir / f"proxy{index}.yaml"
            config.write_text(setup.config_yaml)
            argv += ["--config", str(config)]
        began = time.monotonic()
        child = Child(f"proxy {variant.label} ({setup.describe()})", argv, variant.env(),
                      self.workdir / f"proxy{index}.log", cwd=variant.tree)
        self.children.append(child)
        self.wait_started(key, address, child)
        self.record_start(child, "proxy", variant.label, setup.describe(), time.monotonic() - began)
        target = Target(f"proxy[{variant.label}]", address, self.channel(address), variant, child)
        self._proxies[key] = target
        return target

    def reference(self, name: str) -> Target | None:
        """The reference relay `name`, started (and waited for) on first use; None when it cannot run here."""
        if name in self._references:
            return self._references[name]
        if name in self.skipped_references:
            return None
        if name in self._failed:
            raise RuntimeError(self._failed[name])
        runtime_path = self.runtime_address[len("unix://"):]
        directory = self.workdir / f"ref-{name}"
        directory.mkdir()
        address = f"unix://{directory}/relay.sock"
        if name == NAIVE:
            argv = [sys.executable, os.path.join(ROOT, "bench", "naive_proxy.py"), "--listen", address,
                    "--runtime-endpoint", self.runtime_address]
        elif name in (BYTE_COPY, READ_COPY):
            binary, why = compile_relay(self.workdir)
            if binary is None:
                self.skipped_references[name] = why
                progress(f"reference {name} skipped: {why}")
                return None
            argv = [binary, "--listen", address[len("unix://"):], "--runtime-endpoint", runtime_path]
            if name == READ_COPY:
                argv.append("--copy")
        else:
            raise ValueError(f"unknown reference {name!r}")
        began = time.monotonic()
        child = Child(f"reference {name}", argv, dict(os.environ), self.workdir / f"ref-{name}.log")
        self.children.append(child)
        self.wait_started(name, address, child)
        self.record_start(child, "reference", name, "", time.monotonic() - began)
        target = Target(name, address, self.channel(address), proxy=child, reference=name)
        self._references[name] = target
        return target

    def wait_started(self, key: object, address: str, child: Child) -> None:
        """Until the relay answers; when it does not, stop it and remember why, so that the scenarios after
        this one fail at once instead of starting it again."""
        try:
            wait_answering(address, child)
        except RuntimeError as err:
            child.stop()
            self._failed[key] = f"{err}\n(not started again for the scenarios after this one)"
            raise

    def record_start(self, child: Child, kind: str, variant: str, setup: str, ready: float) -> None:
        """Start-up time, idle CPU and RSS at start of a relay process, for the lines after the tables."""
        time.sleep(0.5)  # settle, then see what an idle relay costs
        cpu0, t0 = child.sample(), time.monotonic()
        time.sleep(1.0)
        idle = cpu0.seconds_until(child.sample()) / (time.monotonic() - t0)
        self.proxy_starts.append({"kind": kind, "variant": variant, "setup": setup, "ready_s": ready,
                                  "idle_cpu_ms_per_s": idle * 1000, "rss_mib": child.status_kib("VmRSS") / 1024})
        progress(f"started {child.name}: answering after {ready:.2f} s, idle CPU {idle * 1000:.0f} ms/s")

    def targets(self, setup: ProxySetup) -> list[Target]:
        """Direct first, then one proxy per variant, then every reference that can run here."""
        assert self.direct is not None
        proxies = [self.proxy(v, setup) for v in self.options.variants]
        references = [self.reference(name) for name in self.options.references]
        return [self.direct, *proxies, *(r for r in references if r is not None)]

    def logs(self, lines: int = 10) -> str:
        """The last lines of every subprocess's log, for an error report."""
        processes = [*self.children, *([self.runtime] if self.containerd is not None and self.runtime else [])]
        return "\n".join(f"--- {c.name} (pid {c.pid}, {'running' if c.alive() else 'exited'}):\n{c.log_tail(lines)}"
                         for c in processes)

    def close(self) -> None:
        """Every channel, every child, then containerd (pods, shims, mounts); never raises."""
        for channel in self._channels:
            with contextlib.suppress(Exception):
                channel.close()
        for child in reversed(self.children):
            child.stop()
        if self.containerd is not None:
            try:
                self.containerd.stop()
            except Exception as err:
                print(f"stopping containerd: {err}", file=sys.stderr)


T = TypeVar("T")


def rotations(targets: list[T], rounds: int) -> Iterator[tuple[int, list[T]]]:
    """Each round visits every target, starting one further along each time (no side always goes first)."""
    for r in range(rounds):
        k = r % len(targets)
        yield r, targets[k:] + targets[:k]


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The client's garbage collector stays out of the timed blocks (it runs between them)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# Scenarios


class Scenario(ABC):
    """A named measurement run direct and through every proxy variant; returns results per variant."""

    name: str
    setup: ProxySetup

    @abstractmethod
    def run(self, bench: Bench) -> dict[str, VariantResult]:
        """Measure; key the results by the proxy target's label."""


@dataclass(frozen=True)
class CpuBaseline:
    """Another call, through a reference, measured in the same alternating CPU chunks as a scenario's own
    calls: the proxy's CPU per call of the scenario must not exceed the reference's for this call (x ratio_max)."""

    reference: str  # a name in REFERENCES
    call: str  # what the call is, for the table: "Version"
    path: str
    request: bytes
    ratio_max: float = 1.0


@dataclass
class CpuJob:
    """A stream of identical calls whose CPU is measured: a target's own, or a baseline call through a reference."""

    label: str
    target: Target
    call: Callable[[], object]


@dataclass
class UnaryScenario(Scenario):
    """One unary call, timed call by call in interleaved blocks, then CPU per call of each process."""

    name: str
    path: str
    request: bytes
    setup: ProxySetup = PLAIN
    metadata: Metadata = ()
    block: int = 200  # calls per interleaved block
    rounds: int = 15  # blocks per target (full mode)
    warmup: int = 200  # calls per target before any timing
    cpu_calls: int = 3000  # calls per target for the CPU measurement (full mode)
    p50_ratio_max: float | None = None
    cpu_us_max: float | None = None
    #: (reference, max ratio or None for a figure without target): the proxy's CPU/call against the reference's.
    cpu_vs_references: tuple[tuple[str, float | None], ...] = ()
    cpu_baseline: CpuBaseline | None = None
    budget_s: float = 60.0  # full mode; each phase stops early once past it

    def run(self, bench: Bench) -> dict[str, VariantResult]:
        targets = bench.targets(self.setup)
        calls = {t.label: t.channel.unary_unary(self.path, None, None) for t in targets}
        size = 0
        warmup = self.warmup if not bench.options.quick else max(20, self.warmup // 4)
        for target in targets:
            for _ in range(warmup):
                size = len(calls[target.label](self.request, metadata=self.metadata, timeout=CALL_TIMEOUT_S))
        latencies = self.measure_latency(bench, targets, calls)
        jobs = [CpuJob(t.label, t, functools.partial(calls[t.label], self.request, metadata=self.metadata,
                                                     timeout=CALL_TIMEOUT_S)) for t in targets]
        base = self.cpu_baseline
        reference = bench.reference(base.reference) if base is not None else None
        if base is not None and reference is not None:
            call = functools.partial(reference.channel.unary_unary(base.path, None, None), base.request,
                                     timeout=CALL_TIMEOUT_S)
            for _ in range(warmup):
                call()
            jobs.append(CpuJob(self.baseline_label(), reference, call))
        cpu = self.measure_cpu(bench, jobs)
        return self.report(bench, targets, latencies, cpu, size)

    def baseline_label(self) -> str:
        assert self.cpu_baseline is not None
        return f"{self.cpu_baseline.reference} {self.cpu_baseline.call}"

    def measure_latency(self, bench: Bench, targets: list[Target],
                        calls: Mapping[str, Callable[..., bytes]]) -> dict[str, list[float]]:
        """Per target, the latency of every timed call in µs."""
        samples: dict[str, list[float]] = {t.label: [] for t in targets}
        rounds, block = bench.scale(self.rounds, 3), self.block
        deadline = time.monotonic() + bench.budget(self.budget_s) * 0.6
        clock, request, metadata = time.perf_counter_ns, self.request, self.metadata
        for r, order in rotations(targets, rounds):
            for target in order:
                call, out = calls[target.label], samples[target.label]
                with no_gc():
                    for _ in range(block):
                        t0 = clock()
                        call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
                        out.append((clock() - t0) / 1000)
            if time.monotonic() > deadline and r >= 1:
                progress(f"{self.name}: latency budget spent after {r + 1} of {rounds} rounds")
                break
        return samples

    def measure_cpu(self, bench: Bench, jobs: list[CpuJob]) -> dict[str, dict[str, float]]:
        """Per job, CPU µs per call of its relay process, the runtime and this client (alternating chunks),
        and the relay's minor page faults per call (fresh memory from the kernel)."""
        total = bench.scale(self.cpu_calls, 200)
        chunks = 4
        per_chunk = max(1, total // chunks)
        spent: dict[str, dict[str, float]] = {
            j.label: {"proxy": 0.0, "proxy_faults": 0.0, "proxy_wait": 0.0, "wait_calls": 0, "runtime": 0.0,
                      "client": 0.0, "calls": 0} for j in jobs}
        assert bench.runtime is not None
        deadline = time.monotonic() + bench.budget(self.budget_s) * 0.4
        for r, order in rotations(jobs, chunks):
            for job in order:
                call, acc, relay = job.call, spent[job.label], job.target.proxy
                p0 = relay.sample() if relay else None
                f0, c0 = bench.runtime.sample(), cpu_sample("self")
                for _ in range(per_chunk):
                    call()
                if relay and p0:
                    p1 = relay.sample()
                    acc["proxy"] += p0.seconds_until(p1)
                    acc["proxy_faults"] += p1.faults - p0.faults
                    if (wait := p0.wait_seconds_until(p1)) is not None:
                        acc["proxy_wait"] += wait
                        acc["wait_calls"] += per_chunk
                acc["runtime"] += f0.seconds_until(bench.runtime.sample())
                acc["client"] += c0.seconds_until(cpu_sample("self"))
                acc["calls"] += per_chunk
            if time.monotonic() > deadline and r >= 1:
                break
        out = {label: {"proxy": acc["proxy"] / acc["calls"] * 1e6, "runtime": acc["runtime"] / acc["calls"] * 1e6,
                       "client": acc["client"] / acc["calls"] * 1e6,
                       "proxy_faults": acc["proxy_faults"] / acc["calls"], "calls": acc["calls"]}
               for label, acc in spent.items()}
        for label, acc in spent.items():
            if acc["wait_calls"]:  # over the chunks whose threads could all be followed
                out[label]["proxy_wait"] = acc["proxy_wait"] / acc["wait_calls"] * 1e6
        return out

    def report(self, bench: Bench, targets: list[Target], latencies: dict[str, list[float]],
               cpu: dict[str, dict[str, float]], size: int) -> dict[str, VariantResult]:
        direct = sorted(latencies[targets[0].label])
        d50, d99 = percentile(direct, 0.5), percentile(direct, 0.99)
        d_cpu = cpu[targets[0].label]
        results: dict[str, VariantResult] = {}
        for target in targets[1:]:
            mine = sorted(latencies[target.label])
            p50, p99 = percentile(mine, 0.5), percentile(mine, 0.99)
            c = cpu[target.label]
            checked = target.is_proxy
            res = VariantResult()
            res.add(Row(f"{self.name} p50", fmt_value(d50, "us"), fmt_value(p50, "us"), fmt_value(ratio(p50, d50), "x"),
                        Check(f"{self.name} p50 ratio", ratio(p50, d50), self.p50_ratio_max, "x")
                        if self.p50_ratio_max and checked else None))
            res.add(Row(f"{self.name} p99", fmt_value(d99, "us"), fmt_value(p99, "us"),
                        fmt_value(ratio(p99, d99), "x")))
            res.add(Row(f"{self.name} proxy CPU/call", "", fmt_value(c["proxy"], "us"), "",
                        Check(f"{self.name} proxy CPU/call", c["proxy"], self.cpu_us_max, "us")
                        if self.cpu_us_max and checked else None))
            comparisons: dict[str, float] = {}
            if checked:
                comparisons = self.cpu_comparisons(bench, res, c["proxy"], cpu)
            res.add(Row(f"{self.name} proxy page faults/call", "", f"{c['proxy_faults']:.0f}"))
            if "proxy_wait" in c:
                # Runnable, waiting for a CPU: on a machine whose cores the client and the runtime share,
                # part of what a relay adds to latency beyond its own CPU.
                res.add(Row(f"{self.name} proxy run-queue wait/call", "", fmt_value(c["proxy_wait"], "us")))
            res.add(Row(f"{self.name} runtime CPU/call", fmt_value(d_cpu["runtime"], "us"),
                        fmt_value(c["runtime"], "us")))
            res.add(Row(f"{self.name} client CPU/call", fmt_value(d_cpu["client"], "us"),
                        fmt_value(c["client"], "us")))
            res.data = {"response_bytes": size, "calls_timed": {"direct": len(direct), "proxy": len(mine)},
                        "direct": {"p50_us": d50, "p99_us": d99, "mean_us": sum(direct) / len(direct), "cpu": d_cpu},
                        "proxy": {"p50_us": p50, "p99_us": p99, "mean_us": sum(mine) / len(mine), "cpu": c},
                        "p50_ratio": ratio(p50, d50), "p99_ratio": ratio(p99, d99)}
            if comparisons:
                res.data["proxy_cpu_ratio_to"] = comparisons
            if self.cpu_baseline is not None and self.baseline_label() in cpu:
                res.data["baseline_cpu"] = {self.baseline_label(): cpu[self.baseline_label()]}
            results[target.label] = res
        return results

    def cpu_comparisons(self, bench: Bench, res: VariantResult, mine: float,
                        cpu: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Rows (and checks) of the proxy's CPU/call against the references' in this run; the ratios."""
        found: dict[str, float] = {}
        wanted = [(name, name, f"{name}'s", limit) for name, limit in self.cpu_vs_references]
        if self.cpu_baseline is not None:
            base = self.cpu_baseline
            wanted.append((base.reference, self.baseline_label(), f"{base.reference}'s {base.call}",
                           base.ratio_max))
        for reference, label, what, limit in wanted:
            metric = f"{self.name} proxy CPU/call vs {what}"
            if label not in cpu:
                why = bench.skipped_references.get(reference, "reference not run (--references)")
                res.add(Row(metric, note=f"skipped: {why}"))
                continue
            theirs = cpu[label]["proxy"]
            found[label] = ratio(mine, theirs)
            res.add(Row(f"{metric} ({fmt_value(theirs, 'us')})", "", fmt_value(mine, "us"),
                        fmt_value(found[label], "x"),
                        Check(f"{self.name} proxy CPU/call / {what}", found[label], limit, "x")
                        if limit is not None else None))
        return found


@dataclass
class StreamScenario(Scenario):
    """One server-streaming call of many small messages per round and target; messages per second."""

    name: str
    path: str
    request: bytes
    setup: ProxySetup = PLAIN
    messages: int = 10_000  # per call (full mode)
    rounds: int = 5  # calls per target (full mode)
    throughput_ratio_min: float | None = None
    budget_s: float = 90.0

    def run(self, bench: Bench) -> dict[str, VariantResult]:
        targets = bench.targets(self.setup)
        calls = {t.label: t.channel.unary_stream(self.path, None, None) for t in targets}
        assert bench.runtime is not None
        count = bench.scale(self.messages, 1000)
        for target in targets:
            self.drain(calls[target.label], min(500, count))
        rates: dict[str, list[float]] = {t.label: [] for t in targets}
        cpu: dict[str, float] = {t.label: 0.0 for t in targets}
        deadline = time.monotonic() + bench.budget(self.budget_s)
        rounds = bench.scale(self.rounds, 3)
        for r, order in rotations(targets, rounds):
            for target in order:
                measured = target.proxy or bench.runtime
                p0 = measured.sample()
                t0 = time.perf_counter()
                got = self.drain(calls[target.label], count)
                rates[target.label].append(got / (time.perf_counter() - t0))
                cpu[target.label] += p0.seconds_until(measured.sample()) / got * 1e6
            if time.monotonic() > deadline and r >= 1:
                progress(f"{self.name}: budget spent after {r + 1} of {rounds} rounds")
                break
        return self.report(targets, rates, cpu, count)

    def drain(self, call: Callable[..., Iterable[bytes]], count: int) -> int:
        got = 0
        with no_gc():
            for _ in call(self.request, metadata=((MESSAGES_METADATA, str(count)),), timeout=120.0):
                got += 1
        if got != count:
            raise RuntimeError(f"{self.name}: expected {count} messages, got {got}")
        return got

    def report(self, targets: list[Target], rates: dict[str, list[float]], cpu: dict[str, float],
               count: int) -> dict[str, VariantResult]:
        direct = median(rates[targets[0].label])
        direct_cpu = cpu[targets[0].label] / len(rates[targets[0].label])
        results: dict[str, VariantResult] = {}
        for target in targets[1:]:
            mine = median(rates[target.label])
            res = VariantResult()
            res.add(Row(f"{self.name} throughput", fmt_value(direct, "msg/s"), fmt_value(mine, "msg/s"),
                        fmt_value(ratio(mine, direct), "x"),
                        Check(f"{self.name} throughput ratio", ratio(mine, direct), self.throughput_ratio_min, "x",
                              at_most=False) if self.throughput_ratio_min and target.is_proxy else None))
            proxy_cpu = cpu[target.label] / len(rates[target.label])
            res.add(Row(f"{self.name} CPU/msg (runtime | proxy)", fmt_value(direct_cpu, "us"),
                        fmt_value(proxy_cpu, "us")))
            res.data = {"messages_per_call": count, "direct_msgs_per_s": rates[targets[0].label],
                        "proxy_msgs_per_s": rates[target.label], "ratio": ratio(mine, direct),
                        "direct_runtime_cpu_us_per_msg": direct_cpu, "proxy_cpu_us_per_msg": proxy_cpu}
            results[target.label] = res
        return results


@dataclass
class BurstScenario(Scenario):
    """Many client channels (one connection each) calling at once; the relay's RSS afterwards."""

    name: str
    calls: tuple[tuple[str, bytes, int], ...]  # (path, request, times) per client, in order
    setup: ProxySetup = PLAIN
    bursts: int = 3  # full mode; the last one's peak RSS is checked (growth between bursts hints a leak)
    #: The relay's peak RSS (VmHWM: the most it ever had resident, whatever ran before) after the last burst,
    #: read while its clients are still connected.
    peak_rss_mib_max: float | None = None
    budget_s: float = 120.0

    def run(self, bench: Bench) -> dict[str, VariantResult]:
        results: dict[str, VariantResult] = {}
        relays = bench.targets(self.setup)[1:]
        for target in relays:
            assert target.proxy is not None
            proxy = target.proxy
            before = proxy.status_kib("VmRSS") / 1024
            bursts = []
            deadline = time.monotonic() + bench.budget(self.budget_s) / len(relays)
            for _ in range(bench.scale(self.bursts, 1)):
                bursts.append(self.burst(bench, target, proxy))
                if time.monotonic() > deadline:
                    break
            last = bursts[-1]
            res = VariantResult()
            res.add(Row("proxy RSS before bursts", "", fmt_value(before, "MiB")))
            for i, b in enumerate(bursts, 1):
                res.add(Row(f"proxy RSS after burst {i} ({b['clients']} clients, {b['seconds']:.1f} s)", "",
                            fmt_value(b["rss_open_mib"], "MiB")))
            check = (Check(f"proxy peak RSS after {bench.options.clients} clients", last["hwm_open_mib"],
                           self.peak_rss_mib_max, "MiB") if self.peak_rss_mib_max and target.is_proxy else None)
            res.add(Row(f"proxy peak RSS after {last['clients']} clients (VmHWM)", "",
                        fmt_value(last["hwm_open_mib"], "MiB"), "", check))
            res.add(Row("proxy RSS once those clients closed", "", fmt_value(last["rss_closed_mib"], "MiB")))
            res.add(Row("proxy peak RSS (VmHWM, whole run)", "", fmt_value(last["hwm_mib"], "MiB")))
            res.data = {"rss_before_mib": before, "bursts": bursts}
            results[target.label] = res
        return results

    def burst(self, bench: Bench, target: Target, proxy: Process) -> dict[str, Any]:
        clients = bench.options.clients
        start = threading.Barrier(clients, timeout=60)
        release = threading.Event()
        done = threading.Semaphore(0)
        errors: list[str] = []
        fds_before = proxy.fd_count()

        def client(i: int) -> None:
            # A local subchannel pool: each client gets its own connection, as separate processes would.
            try:
                with grpc.insecure_channel(target.address, options=[*CHANNEL_OPTIONS,
                                                                    ("grpc.use_local_subchannel_pool", 1)]) as ch:
                    grpc.channel_ready_future(ch).result(timeout=30)
                    start.wait()
                    for path, request, times in self.calls:
                        call = ch.unary_unary(path, None, None)
                        for _ in range(bench.scale(times, 1)):
                            call(request, timeout=CALL_TIMEOUT_S)
                    done.release()
                    release.wait(60)  # hold the connection open until the RSS was read
            except Exception as err:
                errors.append(f"client {i}: {err!r}")
                done.release()

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"client-{i}")
                   for i in range(clients)]
        for thread in threads:
            thread.start()
        for _ in range(clients):
            done.acquire(timeout=120)
        seconds = time.monotonic() - t0
        time.sleep(0.3)
        rss_open, fds_open = proxy.status_kib("VmRSS") / 1024, proxy.fd_count()
        hwm_open = proxy.status_kib("VmHWM") / 1024
        release.set()
        for thread in threads:
            thread.join(30)
        time.sleep(1.0)
        if errors:
            raise RuntimeError(f"{self.name}: {len(errors)} clients failed, first: {errors[0]}")
        return {"clients": clients, "seconds": seconds, "rss_open_mib": rss_open, "hwm_open_mib": hwm_open,
                "rss_closed_mib": proxy.status_kib("VmRSS") / 1024, "hwm_mib": proxy.status_kib("VmHWM") / 1024,
                "proxy_fds_before": fds_before, "proxy_fds_open": fds_open}


def scenarios() -> list[Scenario]:
    """Every scenario against the fake runtime, in run order. Add new ones here."""
    return [
        UnaryScenario("Version", VERSION_PATH, VERSION_REQUEST, block=200, rounds=15, warmup=300,
                      cpu_calls=4000, p50_ratio_max=1.3,
                      cpu_vs_references=((NAIVE, 0.15), (BYTE_COPY, 2.5), (READ_COPY, None)),
                      budget_s=60.0),
        UnaryScenario("ListContainers", LIST_CONTAINERS_PATH, LIST_CONTAINERS_REQUEST, block=25, rounds=12,
                      warmup=30, cpu_calls=400, p50_ratio_max=1.35, cpu_vs_references=REFERENCES_CPU, budget_s=60.0),
        StreamScenario("GetContainerEvents", EVENTS_PATH, EVENTS_REQUEST, messages=10_000, rounds=5,
                       throughput_ratio_min=0.95, budget_s=90.0),
        # Every interceptor on, an annotated call (four changes): the proxy decodes, adjusts and re-encodes it.
        # Its CPU is held against what a naive grpc.aio proxy spends relaying a Version, in the same chunks.
        UnaryScenario("CreateContainer+interceptors", CREATE_CONTAINER_PATH, create_container_request(),
                      setup=ProxySetup(config_yaml=ALL_INTERCEPTORS_YAML), block=100, rounds=10, warmup=100,
                      cpu_calls=2000, cpu_vs_references=REFERENCES_CPU,
                      cpu_baseline=CpuBaseline(NAIVE, "Version", VERSION_PATH, VERSION_REQUEST, ratio_max=1.0),
                      budget_s=60.0),
        BurstScenario("Burst", calls=((LIST_CONTAINERS_PATH, LIST_CONTAINERS_REQUEST, 1),
                                      (VERSION_PATH, VERSION_REQUEST, 20),
                                      (LIST_CONTAINERS_PATH, LIST_CONTAINERS_REQUEST, 1)),
                      bursts=3, peak_rss_mib_max=60.0),
    ]


def containerd_scenarios() -> list[Scenario]:
    """--containerd: read-only calls a kubelet makes all the time, against a real containerd."""
    calls = (("Version", VERSION_PATH, VERSION_REQUEST), ("Status", STATUS_PATH, STATUS_REQUEST),
             ("ListContainers", LIST_CONTAINERS_PATH, LIST_CONTAINERS_REQUEST),
             ("ListImages", LIST_IMAGES_PATH, LIST_IMAGES_REQUEST))
    return [UnaryScenario(name, path, request, block=100, rounds=10, warmup=100, cpu_calls=1200,
                          p50_ratio_max=1.3, cpu_vs_references=REFERENCES_CPU, budget_s=30.0)
            for name, path, request in calls]


def scenario_list(containerd: bool) -> list[Scenario]:
    return containerd_scenarios() if containerd else scenarios()


# ---------------------------------------------------------------------------------------------
# Output


def print_table(title: str, rows: list[Row]) -> None:
    headers = ("metric", "direct", "proxy", "ratio", "target", "result")
    lines = [(r.metric, r.direct, r.proxy, r.ratio, r.check.target_text() if r.check else "",
              r.check.verdict() if r.check else r.note) for r in rows]
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    for line in [headers, tuple("-" * w for w in widths), *lines]:
        cells = zip(line, widths, strict=True)
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip())


def summary_cells(figures: Mapping[str, Any]) -> str:
    """One scenario's key figures for one relay, for the side-by-side summary."""
    if "p50_ratio" in figures:
        return (f"p50 {fmt_value(figures['proxy']['p50_us'], 'us'):>9} ({figures['p50_ratio']:.2f}x direct)  "
                f"CPU/call {fmt_value(figures['proxy']['cpu']['proxy'], 'us'):>9}")
    if "ratio" in figures:
        return f"{fmt_value(median(figures['proxy_msgs_per_s']), 'msg/s'):>9} ({figures['ratio']:.2f}x direct)"
    if figures.get("bursts"):
        last = figures["bursts"][-1]
        return f"RSS {fmt_value(last['rss_open_mib'], 'MiB')} with {last['clients']} clients, " \
               f"peak {fmt_value(last['hwm_open_mib'], 'MiB')}"
    return ""


def print_comparison(labels: list[str], data: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The key figures of every proxy variant and reference, side by side."""
    print("\nside by side (each relay against direct, same run):")
    for label in labels:
        print(f"  {label}")
        for name, figures in data.get(label, {}).items():
            cells = summary_cells(figures)
            if cells:
                print(f"    {name:<30} {cells}")


def run(options: Options, selected: list[str]) -> dict[str, Any]:
    """Start everything, run the scenarios, print the tables; return the JSON report."""
    workdir = Path(tempfile.mkdtemp(prefix="crib-", dir="/tmp"))  # short: unix socket paths are limited
    bench = Bench(options, workdir)
    by_target: dict[str, dict[str, dict[str, Any]]] = {}
    rows: dict[str, list[Row]] = {}
    checks: dict[str, list[Check]] = {}
    errors: list[str] = []
    try:
        bench.start_runtime()
        progress(f"runtime up; harness GRPC_EXPERIMENTS={HARNESS_GRPC_EXPERIMENTS!r}; "
                 f"client :authority as {options.client_authority} sends it")
        for scenario in scenario_list(options.containerd):
            if selected and scenario.name not in selected:
                continue
            progress(f"scenario {scenario.name} ({scenario.setup.describe()} proxy)")
            try:
                results = scenario.run(bench)
            except (grpc.RpcError, RuntimeError) as err:  # report it, go on with the other scenarios
                errors.append(f"{scenario.name}: {err}\n{bench.logs()}")
                progress(f"scenario {scenario.name} FAILED: {err}")
                continue
            for label, result in results.items():
                rows.setdefault(label, []).extend(result.rows)
                checks.setdefault(label, []).extend(result.checks)
                by_target.setdefault(label, {})[scenario.name] = result.data
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(bench, rows, by_target, errors)
    return json_report(bench, by_target, checks, errors)


def print_report(bench: Bench, rows: dict[str, list[Row]], by_target: dict[str, dict[str, dict[str, Any]]],
                 errors: list[str]) -> None:
    options = bench.options
    print(f"\ncriproxy forwarding benchmark: {'quick' if options.quick else 'full'} mode, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, grpcio {grpc.__version__}, {time.monotonic() - _started:.0f} s")
    print(f"runtime: {bench.runtime_description}")
    print(f"harness (client{'' if options.containerd else ' + fake runtime'}): GRPC_EXPERIMENTS="
          f"{HARNESS_GRPC_EXPERIMENTS!r}, malloc top pad {HARNESS_TOP_PAD >> 20} MiB")
    for variant in options.variants:
        print_table(f"proxy variant: {variant.label} ({variant.effective()})",
                    rows.get(f"proxy[{variant.label}]", []))
    for name in options.references:
        if name in bench.skipped_references:
            print(f"\nreference: {name}: skipped, {bench.skipped_references[name]}")
        elif name in rows:
            print_table(f"reference: {name}, {REFERENCES[name]} (no targets)", rows[name])
    for start in bench.proxy_starts:
        setup = f" ({start['setup']})" if start["setup"] else ""
        print(f"{start['kind']} {start['variant']}{setup}: answering {start['ready_s']:.2f} s after spawn, "
              f"idle CPU {start['idle_cpu_ms_per_s']:.1f} ms/s, RSS at start {start['rss_mib']:.1f} MiB")
    labels = [f"proxy[{v.label}]" for v in options.variants] + [n for n in options.references if n in by_target]
    if len(labels) > 1:
        print_comparison(labels, by_target)
    for error in errors:
        print(f"\nERROR in scenario {error}")


def json_report(bench: Bench, by_target: dict[str, dict[str, dict[str, Any]]], checks: dict[str, list[Check]],
                errors: list[str]) -> dict[str, Any]:
    options = bench.options
    return {
        "errors": errors,
        "mode": "quick" if options.quick else "full", "cpus": os.cpu_count(), "python": platform.python_version(),
        "grpcio": grpc.__version__, "harness_grpc_experiments": HARNESS_GRPC_EXPERIMENTS,
        "runtime": "containerd" if options.containerd else "fake", "runtime_description": bench.runtime_description,
        "containers": options.containers, "clients": options.clients, "client_authority": options.client_authority,
        "proxy_starts": bench.proxy_starts,
        "variants": [{"label": v.label, "env": dict(v.overrides), "grpc_experiments": v.experiments(),
                      "results": by_target.get(f"proxy[{v.label}]", {}),
                      "checks": [c.as_json() for c in checks.get(f"proxy[{v.label}]", [])]}
                     for v in options.variants],
        "references": [{"label": name, "description": REFERENCES[name],
                        "skipped": bench.skipped_references.get(name), "results": by_target.get(name, {})}
                       for name in options.references],
    }


def parse_args(argv: list[str] | None) -> tuple[Options, list[str], argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about a quarter of the calls (under a minute)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write every figure to this JSON file")
    parser.add_argument("--grpc-experiments", action="append", default=[], metavar="VALUE",
                        help="GRPC_EXPERIMENTS for the proxy process; repeat to compare variants in one run. "
                             "'inherit' (the default) passes the benchmark's own environment, so criproxy applies "
                             "its default; 'none' sets it empty (gRPC's built-in defaults)")
    parser.add_argument("--proxy-env-variant", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help="one more proxy variant with these environment variables, e.g. "
                             "'GLIBC_TUNABLES=glibc.malloc.trim_threshold=268435456'; repeatable")
    parser.add_argument("--proxy-tree", action="append", default=[], metavar="DIR",
                        help="one more proxy variant run from this copy of the source tree (its criproxy package), "
                             "e.g. a snapshot taken before a change, to compare before and after in one run")
    parser.add_argument("--scenario", action="append", default=[], metavar="NAME",
                        help=f"run only these ({', '.join(s.name for s in scenarios())}; with --containerd "
                             f"{', '.join(s.name for s in containerd_scenarios())}); repeatable")
    parser.add_argument("--references", default=",".join(REFERENCES), metavar="NAME,...",
                        help=f"reference relays measured beside the proxy (default: {','.join(REFERENCES)}; "
                             "'' for none)")
    parser.add_argument("--containerd", action="store_true",
                        help="in front of a private, real containerd instead of the fake runtime (needs root, "
                             "containerd, runc, gcc)")
    parser.add_argument("--containerd-pods", type=int, default=10,
                        help="pods (two created containers each) made in that containerd first")
    parser.add_argument("--containers", type=int, default=1000, help="containers the fake runtime's ListContainers "
                                                                      "answers")
    parser.add_argument("--clients", type=int, default=64, help="concurrent client channels in the burst")
    parser.add_argument("--client-authority", choices=sorted(CLIENT_AUTHORITIES), default="kubelet",
                        help="the :authority the client sends: 'kubelet' (the default) sends localhost as grpc-go "
                             "does; 'grpcio' keeps grpcio's percent-encoded socket path, which the proxy rewrites")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    variants: list[Variant] = []
    try:
        wanted = [Variant.for_experiments(v) for v in args.grpc_experiments]
        wanted += [Variant.parse(spec) for spec in args.proxy_env_variant]
        wanted += [Variant(((PROXY_TREE_KEY, os.path.abspath(tree)),)) for tree in args.proxy_tree]
    except ValueError as err:
        parser.error(f"--proxy-env-variant: {err}")
    for variant in wanted or [Variant()]:
        if variant not in variants:
            variants.append(variant)
    unknown = set(args.scenario) - {s.name for s in scenario_list(args.containerd)}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    references = [name.strip() for name in args.references.split(",") if name.strip()]
    if set(references) - set(REFERENCES):
        parser.error(f"--references: known ones are {', '.join(REFERENCES)}")
    options = Options(quick=args.quick, variants=variants, containers=args.containers, clients=args.clients,
                      references=list(dict.fromkeys(references)), containerd=args.containerd,
                      containerd_pods=args.containerd_pods, client_authority=args.client_authority)
    return options, args.scenario, args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run()'s cleanup


def main(argv: list[str] | None = None) -> int:
    options, selected, args = parse_args(argv)
    CHANNEL_OPTIONS.extend(CLIENT_AUTHORITIES[options.client_authority])
    signal.signal(signal.SIGTERM, _terminate)
    tune_harness_malloc()
    try:
        report = run(options, selected)
    except KeyboardInterrupt:
        print("interrupted; subprocesses stopped", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    missed = [c for v in report["variants"] for c in v["checks"] if c["verdict"] != "PASS"]
    return 1 if report["errors"] or (args.fail_on_miss and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
