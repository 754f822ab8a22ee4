"""Forwarding benchmark: criproxy side by side with a direct connection to the same runtime, in one run.

    python bench/forwarding.py [--quick] [--json OUT] [--grpc-experiments VALUE ...] [--scenario NAME ...]

Three kinds of process, all on loopback unix sockets in a temporary directory:

1. a fast fake runtime (bench/fake_runtime.py: pre-serialized answers),
2. the proxy, started as `python -m criproxy serve` in front of it (one per variant and setup),
3. this process, the client: synchronous gRPC with raw bytes, as the kubelet would call.

Each scenario measures the same call direct and through every proxy variant in interleaved
blocks (so drift, CPU frequency and noisy neighbours hit both sides alike), after a warm-up,
and reports p50/p99, ratios, the proxy process's CPU per call (utime+stime from /proc/PID/stat)
and its RSS. Targets print PASS or MISS; nothing here fails a test suite. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
from typing import Any

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
]
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


class Child:
    """A subprocess of the benchmark: its log file, CPU and memory counters, and a bounded stop."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path,
                 cwd: str = ROOT) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        launcher = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
        self.proc = subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime+stime of every thread of the process, from /proc/PID/stat."""
        return proc_cpu_seconds(self.pid)

    def stat(self) -> tuple[float, int]:
        return proc_stat(self.pid)

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


def proc_status_kib(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def wait_answering(target: str, child: Child, timeout: float = START_TIMEOUT_S) -> None:
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


# ---------------------------------------------------------------------------------------------
# What is measured


VERSION_PATH = "/runtime.v1.RuntimeService/Version"
VERSION_REQUEST = api_pb2.VersionRequest(version="v1").SerializeToString()
LIST_CONTAINERS_PATH = "/runtime.v1.RuntimeService/ListContainers"
LIST_CONTAINERS_REQUEST = api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter()).SerializeToString()
EVENTS_PATH = "/runtime.v1.RuntimeService/GetContainerEvents"
EVENTS_REQUEST = api_pb2.GetEventsRequest().SerializeToString()


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
    variant: Variant | None = None  # None: direct
    proxy: Child | None = None


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


class Bench:
    """The running harness: temp dir, fake runtime, proxies (started on first use) and channels."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.children: list[Child] = []
        self._channels: list[grpc.Channel] = []
        self._proxies: dict[tuple[Variant, ProxySetup], Target] = {}
        self.runtime_address = f"unix://{workdir}/runtime.sock"
        self.runtime: Child | None = None
        self.direct: Target | None = None
        self.proxy_starts: list[dict[str, Any]] = []

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
        env = dict(os.environ)
        env.setdefault("GLIBC_TUNABLES", f"glibc.malloc.top_pad={HARNESS_TOP_PAD}")
        argv = [sys.executable, os.path.join(ROOT, "bench", "fake_runtime.py"), "--listen",
                self.runtime_address[len("unix://"):], "--containers", str(self.options.containers)]
        self.runtime = Child("fake runtime", argv, env, self.workdir / "runtime.log")
        self.children.append(self.runtime)
        wait_answering(self.runtime_address, self.runtime)
        self.direct = Target("direct", self.runtime_address, self.channel(self.runtime_address))

    def proxy(self, variant: Variant, setup: ProxySetup) -> Target:
        """The proxy for this variant and setup, started (and waited for) on first use."""
        key = (variant, setup)
        if key in self._proxies:
            return self._proxies[key]
        index = len(self._proxies)
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
        wait_answering(address, child)
        ready = time.monotonic() - began
        time.sleep(0.5)  # settle, then see what an idle proxy costs
        cpu0, t0 = child.cpu_seconds(), time.monotonic()
        time.sleep(1.0)
        idle = (child.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        self.proxy_starts.append({"variant": variant.label, "setup": setup.describe(), "ready_s": ready,
                                  "idle_cpu_ms_per_s": idle * 1000, "rss_mib": child.status_kib("VmRSS") / 1024})
        progress(f"started {child.name}: answering after {ready:.2f} s, idle CPU {idle * 1000:.0f} ms/s")
        target = Target(f"proxy[{variant.label}]", address, self.channel(address), variant, child)
        self._proxies[key] = target
        return target

    def targets(self, setup: ProxySetup) -> list[Target]:
        """Direct first, then one proxy per variant."""
        assert self.direct is not None
        return [self.direct, *(self.proxy(v, setup) for v in self.options.variants)]

    def logs(self, lines: int = 10) -> str:
        """The last lines of every subprocess's log, for an error report."""
        return "\n".join(f"--- {c.name} (pid {c.pid}, {'running' if c.alive() else 'exited'}):\n{c.log_tail(lines)}"
                         for c in self.children)

    def close(self) -> None:
        for channel in self._channels:
            with contextlib.suppress(Exception):
                channel.close()
        for child in reversed(self.children):
            child.stop()


def rotations(targets: list[Target], rounds: int) -> Iterator[tuple[int, list[Target]]]:
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
    budget_s: float = 60.0  # full mode; each phase stops early once past it

    def run(self, bench: Bench) -> dict[str, VariantResult]:
        targets = bench.targets(self.setup)
        calls = {t.label: t.channel.unary_unary(self.path, None, None) for t in targets}
        size = 0
        for target in targets:
            for _ in range(self.warmup if not bench.options.quick else max(20, self.warmup // 4)):
                size = len(calls[target.label](self.request, metadata=self.metadata, timeout=CALL_TIMEOUT_S))
        latencies = self.measure_latency(bench, targets, calls)
        cpu = self.measure_cpu(bench, targets, calls)
        return self.report(targets, latencies, cpu, size)

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

    def measure_cpu(self, bench: Bench, targets: list[Target],
                    calls: Mapping[str, Callable[..., bytes]]) -> dict[str, dict[str, float]]:
        """Per target, CPU µs per call of the proxy, the fake runtime and this client (alternating chunks),
        and the proxy's minor page faults per call (fresh memory from the kernel)."""
        total = bench.scale(self.cpu_calls, 200)
        chunks = 4
        per_chunk = max(1, total // chunks)
        spent: dict[str, dict[str, float]] = {
            t.label: {"proxy": 0.0, "proxy_faults": 0.0, "runtime": 0.0, "client": 0.0, "calls": 0} for t in targets}
        assert bench.runtime is not None
        deadline = time.monotonic() + bench.budget(self.budget_s) * 0.4
        for r, order in rotations(targets, chunks):
            for target in order:
                call, acc = calls[target.label], spent[target.label]
                p0, m0 = target.proxy.stat() if target.proxy else (0.0, 0)
                f0, c0 = bench.runtime.cpu_seconds(), proc_cpu_seconds("self")
                for _ in range(per_chunk):
                    call(self.request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
                if target.proxy:
                    p1, m1 = target.proxy.stat()
                    acc["proxy"] += p1 - p0
                    acc["proxy_faults"] += m1 - m0
                acc["runtime"] += bench.runtime.cpu_seconds() - f0
                acc["client"] += proc_cpu_seconds("self") - c0
                acc["calls"] += per_chunk
            if time.monotonic() > deadline and r >= 1:
                break
        return {label: {"proxy": acc["proxy"] / acc["calls"] * 1e6, "runtime": acc["runtime"] / acc["calls"] * 1e6,
                        "client": acc["client"] / acc["calls"] * 1e6,
                        "proxy_faults": acc["proxy_faults"] / acc["calls"], "calls": acc["calls"]}
                for label, acc in spent.items()}

    def report(self, targets: list[Target], latencies: dict[str, list[float]],
               cpu: dict[str, dict[str, float]], size: int) -> dict[str, VariantResult]:
        direct = sorted(latencies[targets[0].label])
        d50, d99 = percentile(direct, 0.5), percentile(direct, 0.99)
        d_cpu = cpu[targets[0].label]
        results: dict[str, VariantResult] = {}
        for target in targets[1:]:
            mine = sorted(latencies[target.label])
            p50, p99 = percentile(mine, 0.5), percentile(mine, 0.99)
            c = cpu[target.label]
            res = VariantResult()
            res.add(Row(f"{self.name} p50", fmt_value(d50, "us"), fmt_value(p50, "us"), fmt_value(ratio(p50, d50), "x"),
                        Check(f"{self.name} p50 ratio", ratio(p50, d50), self.p50_ratio_max, "x")
                        if self.p50_ratio_max else None))
            res.add(Row(f"{self.name} p99", fmt_value(d99, "us"), fmt_value(p99, "us"),
                        fmt_value(ratio(p99, d99), "x")))
            res.add(Row(f"{self.name} proxy CPU/call", "", fmt_value(c["proxy"], "us"), "",
                        Check(f"{self.name} proxy CPU/call", c["proxy"], self.cpu_us_max, "us")
                        if self.cpu_us_max else None))
            res.add(Row(f"{self.name} proxy page faults/call", "", f"{c['proxy_faults']:.0f}"))
            res.add(Row(f"{self.name} runtime CPU/call", fmt_value(d_cpu["runtime"], "us"),
                        fmt_value(c["runtime"], "us")))
            res.add(Row(f"{self.name} client CPU/call", fmt_value(d_cpu["client"], "us"),
                        fmt_value(c["client"], "us")))
            res.data = {"response_bytes": size, "calls_timed": {"direct": len(direct), "proxy": len(mine)},
                        "direct": {"p50_us": d50, "p99_us": d99, "mean_us": sum(direct) / len(direct), "cpu": d_cpu},
                        "proxy": {"p50_us": p50, "p99_us": p99, "mean_us": sum(mine) / len(mine), "cpu": c},
                        "p50_ratio": ratio(p50, d50), "p99_ratio": ratio(p99, d99)}
            results[target.label] = res
        return results


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
        rounds = bench.scale(self.rounds, 2)
        for r, order in rotations(targets, rounds):
            for target in order:
                p0 = target.proxy.cpu_seconds() if target.proxy else bench.runtime.cpu_seconds()
                t0 = time.perf_counter()
                got = self.drain(calls[target.label], count)
                rates[target.label].append(got / (time.perf_counter() - t0))
                p1 = target.proxy.cpu_seconds() if target.proxy else bench.runtime.cpu_seconds()
                cpu[target.label] += (p1 - p0) / got * 1e6
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
                              at_most=False) if self.throughput_ratio_min else None))
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
    """Many client channels (one connection each) calling at once; the proxy's RSS afterwards."""

    name: str
    calls: tuple[tuple[str, bytes, int], ...]  # (path, request, times) per client, in order
    setup: ProxySetup = PLAIN
    bursts: int = 3  # full mode; the last one's RSS is checked (growth between bursts hints a leak)
    rss_mib_max: float | None = None
    budget_s: float = 120.0

    def run(self, bench: Bench) -> dict[str, VariantResult]:
        results: dict[str, VariantResult] = {}
        for target in bench.targets(self.setup)[1:]:
            assert target.proxy is not None
            proxy = target.proxy
            before = proxy.status_kib("VmRSS") / 1024
            bursts = []
            deadline = time.monotonic() + bench.budget(self.budget_s) / len(bench.options.variants)
            for _ in range(bench.scale(self.bursts, 1)):
                bursts.append(self.burst(bench, target, proxy))
                if time.monotonic() > deadline:
                    break
            last = bursts[-1]
            res = VariantResult()
            res.add(Row("proxy RSS before bursts", "", fmt_value(before, "MiB")))
            for i, b in enumerate(bursts, 1):
                check = (Check(f"proxy RSS after {bench.options.clients} clients", b["rss_open_mib"],
                               self.rss_mib_max, "MiB") if self.rss_mib_max and b is last else None)
                res.add(Row(f"proxy RSS after burst {i} ({b['clients']} clients, {b['seconds']:.1f} s)", "",
                            fmt_value(b["rss_open_mib"], "MiB"), "", check))
            res.add(Row("proxy RSS once those clients closed", "", fmt_value(last["rss_closed_mib"], "MiB")))
            res.add(Row("proxy peak RSS (VmHWM, whole run)", "", fmt_value(last["hwm_mib"], "MiB")))
            res.data = {"rss_before_mib": before, "bursts": bursts}
            results[target.label] = res
        return results

    def burst(self, bench: Bench, target: Target, proxy: Child) -> dict[str, Any]:
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
        release.set()
        for thread in threads:
            thread.join(30)
        time.sleep(1.0)
        if errors:
            raise RuntimeError(f"{self.name}: {len(errors)} clients failed, first: {errors[0]}")
        return {"clients": clients, "seconds": seconds, "rss_open_mib": rss_open,
                "rss_closed_mib": proxy.status_kib("VmRSS") / 1024, "hwm_mib": proxy.status_kib("VmHWM") / 1024,
                "proxy_fds_before": fds_before, "proxy_fds_open": fds_open}


def scenarios() -> list[Scenario]:
    """Every scenario, in run order. Add new ones here (e.g. an intercepted CreateContainer with a setup
    whose config_yaml enables the interceptors)."""
    return [
        UnaryScenario("Version", VERSION_PATH, VERSION_REQUEST, block=200, rounds=15, warmup=300,
                      cpu_calls=4000, p50_ratio_max=2.0, cpu_us_max=250.0, budget_s=60.0),
        UnaryScenario("ListContainers", LIST_CONTAINERS_PATH, LIST_CONTAINERS_REQUEST, block=25, rounds=12,
                      warmup=30, cpu_calls=400, p50_ratio_max=2.0, budget_s=60.0),
        StreamScenario("GetContainerEvents", EVENTS_PATH, EVENTS_REQUEST, messages=10_000, rounds=5,
                       throughput_ratio_min=0.8, budget_s=90.0),
        BurstScenario("Burst", calls=((LIST_CONTAINERS_PATH, LIST_CONTAINERS_REQUEST, 1),
                                      (VERSION_PATH, VERSION_REQUEST, 20),
                                      (LIST_CONTAINERS_PATH, LIST_CONTAINERS_REQUEST, 1)),
                      bursts=3, rss_mib_max=80.0),
    ]


# ---------------------------------------------------------------------------------------------
# Output


def print_table(variant: Variant, rows: list[Row]) -> None:
    headers = ("metric", "direct", "proxy", "ratio", "target", "result")
    lines = [(r.metric, r.direct, r.proxy, r.ratio, r.check.target_text() if r.check else "",
              r.check.verdict() if r.check else "") for r in rows]
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(headers)]
    print(f"\nproxy variant: {variant.label} ({variant.effective()})")
    for line in [headers, tuple("-" * w for w in widths), *lines]:
        cells = zip(line, widths, strict=True)
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))


def print_comparison(variants: list[Variant], data: dict[str, dict[str, dict[str, Any]]]) -> None:
    """With several variants: the key figures side by side."""
    print("\nvariants side by side:")
    for variant in variants:
        print(f"  {variant.label}")
        for name, figures in data.get(f"proxy[{variant.label}]", {}).items():
            if "p50_ratio" in figures:
                print(f"    {name:<20} p50 {fmt_value(figures['proxy']['p50_us'], 'us'):>9} "
                      f"({figures['p50_ratio']:.2f}x direct)  proxy CPU/call "
                      f"{fmt_value(figures['proxy']['cpu']['proxy'], 'us'):>9}")
            elif "ratio" in figures:
                print(f"    {name:<20} {fmt_value(median(figures['proxy_msgs_per_s']), 'msg/s'):>9} "
                      f"({figures['ratio']:.2f}x direct)")


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
        progress(f"fake runtime up; harness GRPC_EXPERIMENTS={HARNESS_GRPC_EXPERIMENTS!r}")
        for scenario in scenarios():
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
    print(f"\ncriproxy forwarding benchmark: {'quick' if options.quick else 'full'} mode, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, grpcio {grpc.__version__}, {time.monotonic() - _started:.0f} s")
    print(f"harness (client + fake runtime): GRPC_EXPERIMENTS={HARNESS_GRPC_EXPERIMENTS!r}, malloc top pad "
          f"{HARNESS_TOP_PAD >> 20} MiB; ListContainers answers {options.containers} containers")
    for variant in options.variants:
        print_table(variant, rows.get(f"proxy[{variant.label}]", []))
    for start in bench.proxy_starts:
        print(f"proxy {start['variant']} ({start['setup']}): answering {start['ready_s']:.2f} s after spawn, "
              f"idle CPU {start['idle_cpu_ms_per_s']:.1f} ms/s, RSS at start {start['rss_mib']:.1f} MiB")
    if len(options.variants) > 1:
        print_comparison(options.variants, by_target)
    for error in errors:
        print(f"\nERROR in scenario {error}")
    return {
        "errors": errors,
        "mode": "quick" if options.quick else "full", "cpus": os.cpu_count(), "python": platform.python_version(),
        "grpcio": grpc.__version__, "harness_grpc_experiments": HARNESS_GRPC_EXPERIMENTS,
        "containers": options.containers, "clients": options.clients, "proxy_starts": bench.proxy_starts,
        "variants": [{"label": v.label, "env": dict(v.overrides), "grpc_experiments": v.experiments(),
                      "results": by_target.get(f"proxy[{v.label}]", {}),
                      "checks": [c.as_json() for c in checks.get(f"proxy[{v.label}]", [])]}
                     for v in options.variants],
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
                        help=f"run only these ({', '.join(s.name for s in scenarios())}); repeatable")
    parser.add_argument("--containers", type=int, default=1000, help="containers ListContainers answers")
    parser.add_argument("--clients", type=int, default=64, help="concurrent client channels in the burst")
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
    unknown = set(args.scenario) - {s.name for s in scenarios()}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return Options(quick=args.quick, variants=variants, containers=args.containers, clients=args.clients), \
        args.scenario, args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through run()'s cleanup


def main(argv: list[str] | None = None) -> int:
    options, selected, args = parse_args(argv)
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
