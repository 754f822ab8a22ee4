"""Proxy CPU per call under different proxy setups, side by side in one run.

    python bench/overhead.py [--calls N] [--rounds N]

Starts the fast fake runtime (bench/fake_runtime.py) and several `criproxy serve` processes in
front of it, then measures each proxy process's CPU time (utime+stime from /proc/PID/stat) per
call, in interleaved rounds, for:

- passthrough: Version through a proxy with no interceptors, no metrics (the baseline);
- CreateContainer, interceptors off: the same call shape as below, relayed as bytes;
- CreateContainer, interceptors on: an annotated CreateContainer through the default
  interceptors (decoded, adjusted, re-encoded), the issue's "no more than 2x a passthrough call";
- observed: Version with metrics on and tracing on but sampled off (OTEL_TRACES_SAMPLER=
  always_off), the issue's "no more than 10% more CPU"; and with a parent-based sampler and no
  caller trace (spans are made, extracted and injected, but not recorded).

Not a test: it prints figures and PASS/MISS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from criproxy.api.runtime.v1 import api_pb2  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create_request() -> bytes:
    sandbox = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web-7d9f", namespace="shop", uid="0f6b"),
        labels={"app": "web"}, annotations={"memory-limit.criproxy.io/container.app": "512Mi",
                                            "cpu-quota.criproxy.io/pod": "500m", "app.kubernetes.io/name": "web"})
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id="a" * 64, sandbox_config=sandbox,
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="app"), image=api_pb2.ImageSpec(image="registry/web:1"),
            command=["/app"], envs=[api_pb2.KeyValue(key=f"K{i}", value=b"v") for i in range(10)],
            linux=api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(
                cpu_period=100_000, cpu_quota=200_000, cpu_shares=1024, memory_limit_in_bytes=1 << 30,
                memory_swap_limit_in_bytes=1 << 30)))).SerializeToString()


@dataclass
class Setup:
    name: str
    args: tuple[str, ...]
    env: dict[str, str]
    path: str
    request: bytes
    proc: subprocess.Popen[bytes] | None = None
    socket: str = ""


def start(setup: Setup, work: Path, runtime: Path, index: int) -> None:
    setup.socket = str(work / f"p{index}.sock")
    setup.proc = subprocess.Popen(
        [sys.executable, "-m", "criproxy", "serve", "--listen", f"unix://{setup.socket}", "--runtime-endpoint",
         f"unix://{runtime}", "--log-level", "warning", *setup.args],
        cwd=ROOT, env={**os.environ, **setup.env}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not Path(setup.socket).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{setup.name}: the proxy did not start")
        time.sleep(0.05)


def measure(setup: Setup, calls: int) -> float:
    assert setup.proc is not None
    with grpc.insecure_channel(f"unix://{setup.socket}") as chan:
        stub = chan.unary_unary(setup.path)
        for _ in range(50):
            stub(setup.request, timeout=10)
        before = cpu_seconds(setup.proc.pid)
        for _ in range(calls):
            stub(setup.request, timeout=10)
        return (cpu_seconds(setup.proc.pid) - before) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overhead-", dir="/tmp"))
    config = work / "off.yaml"
    config.write_text("interceptors: []\n")
    create = create_request()
    version = "/runtime.v1.RuntimeService/Version"
    setups = [
        Setup("passthrough Version (no interceptors, no metrics)",
              ("--config", str(config), "--metrics-address", "off"), {}, version, b""),
        Setup("CreateContainer, interceptors off", ("--config", str(config), "--metrics-address", "off"), {},
              "/runtime.v1.RuntimeService/CreateContainer", create),
        Setup("CreateContainer, interceptors on (3 changes)", ("--metrics-address", "off"), {},
              "/runtime.v1.RuntimeService/CreateContainer", create),
        Setup("Version, metrics on + tracing sampled off", ("--config", str(config), "--metrics-address",
                                                             "127.0.0.1:0"),
              {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_off"}, version, b""),
        Setup("Version, metrics on + tracing on, parent-based (no parent)",
              ("--config", str(config), "--metrics-address", "127.0.0.1:0"),
              {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "parentbased_always_off"}, version, b""),
    ]
    runtime_sock = work / "runtime.sock"
    fake = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_runtime.py"), "--listen", str(runtime_sock)],
                            cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        while not runtime_sock.exists():
            time.sleep(0.05)
        for i, setup in enumerate(setups):
            start(setup, work, runtime_sock, i)
        samples: dict[str, list[float]] = {s.name: [] for s in setups}
        for r in range(args.rounds):
            order = setups if r % 2 == 0 else list(reversed(setups))
            for setup in order:
                samples[setup.name].append(measure(setup, args.calls))
        med = {name: statistics.median(values) for name, values in samples.items()}
        print(f"{'setup':58} {'proxy CPU/call':>15}  (median of {args.rounds} rounds x {args.calls} calls)")
        for name, value in med.items():
            print(f"{name:58} {value:12.0f} µs")
        base, create_on = med[setups[0].name], med[setups[2].name]
        observed = med[setups[3].name]
        print(f"\nCreateContainer with interceptors vs a passthrough call: {create_on / base:.2f}x (target <= 2x): "
              f"{'PASS' if create_on <= 2 * base else 'MISS'}")
        print(f"metrics + tracing (sampled off) vs none, Version: {observed / base - 1:+.1%} (target <= +10%): "
              f"{'PASS' if observed <= 1.1 * base else 'MISS'}")
        return 0
    finally:
        for setup in setups:
            if setup.proc is not None:
                setup.proc.terminate()
                setup.proc.wait(20)
        fake.terminate()
        fake.wait(20)


if __name__ == "__main__":
    sys.exit(main())
