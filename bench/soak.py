"""Soak: 64 concurrent kubelet-like clients through criproxy for minutes; errors, latency, RSS over time.

    python bench/soak.py [--clients 64] [--calls 10000] [--minutes 5] [--json OUT]

Processes, on loopback unix sockets in a temporary directory: the fast fake runtime
(bench/fake_runtime.py), `criproxy serve` in front of it with the default interceptors and the
repository's policies.yaml, and this client: --clients asyncio tasks, each with its own
connection and an open GetContainerEvents stream (one event a second), each making --calls
mixed calls (lists, statuses, Version, an annotated CreateContainer and its RemoveContainer,
ImageStatus) without pause. It stops when every client is done or --minutes have passed,
whichever is first (both bound the run), and prints errors by code, latency percentiles per
call, throughput, and the proxy's RSS sampled every --sample seconds (flat after warm-up is the
target). Not a test: it reports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402

from criproxy.api.runtime.v1 import api_pb2  # noqa: E402


def requests() -> list[tuple[str, bytes]]:
    sandbox = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="soak", namespace="criproxy-demo", uid="u-soak"),
        annotations={"memory-limit.criproxy.io/pod": "128Mi", "app.kubernetes.io/name": "soak"})
    create = api_pb2.CreateContainerRequest(
        pod_sandbox_id="p" * 64, sandbox_config=sandbox,
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="app"),
            linux=api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(
                memory_limit_in_bytes=1 << 30, memory_swap_limit_in_bytes=1 << 30, cpu_period=100_000,
                cpu_quota=100_000))))
    cid = api_pb2.ContainerStatusRequest(container_id="c" * 64).SerializeToString()
    return [
        ("RuntimeService/ListContainers", b""),
        ("RuntimeService/ListPodSandbox", b""),
        ("RuntimeService/ContainerStatus", cid),
        ("RuntimeService/PodSandboxStatus",
         api_pb2.PodSandboxStatusRequest(pod_sandbox_id="p" * 64).SerializeToString()),
        ("RuntimeService/Version", b""),
        ("RuntimeService/Status", b""),
        ("RuntimeService/CreateContainer", create.SerializeToString()),
        ("RuntimeService/RemoveContainer", api_pb2.RemoveContainerRequest(container_id="").SerializeToString()),
        ("ImageService/ImageStatus", api_pb2.ImageStatusRequest(
            image=api_pb2.ImageSpec(image="registry.example/app:1")).SerializeToString()),
    ]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Results:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.stream_errors: Counter[str] = Counter()
        self.events = 0
        self.rss: list[tuple[float, float]] = []


async def client(target: str, calls: int, deadline: float, results: Results) -> None:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as chan:
        stream = chan.unary_stream("/runtime.v1.RuntimeService/GetContainerEvents")(
            b"", metadata=(("x-bench-messages", "1000000"), ("x-bench-interval", "1.0")))

        async def follow() -> None:
            try:
                async for _ in stream:
                    results.events += 1
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    results.stream_errors[err.code().name] += 1

        follower = asyncio.ensure_future(follow())
        plan = requests()
        stubs = [(key, chan.unary_unary(f"/runtime.v1.{key}"), body) for key, body in plan]
        for i in range(calls):
            if time.monotonic() > deadline:
                break
            key, stub, body = stubs[i % len(stubs)]
            started = time.perf_counter()
            try:
                await stub(body, timeout=30)
                results.latency[key].append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as err:
                results.errors[f"{key} {err.code().name}: {err.details()}"] += 1
        stream.cancel()
        await asyncio.gather(follower, return_exceptions=True)


async def sample(pid: int, every: float, results: Results, stop: asyncio.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        results.rss.append((time.monotonic() - start, rss_mib(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    results.rss.append((time.monotonic() - start, rss_mib(pid)))


async def drive(target: str, pid: int, args: argparse.Namespace) -> tuple[Results, float]:
    results = Results()
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample(pid, args.sample, results, stop))
    deadline = time.monotonic() + args.minutes * 60
    started = time.monotonic()
    await asyncio.gather(*(client(target, args.calls, deadline, results) for _ in range(args.clients)))
    elapsed = time.monotonic() - started
    stop.set()
    await sampler
    return results, elapsed


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"soak: {path} did not appear (process exited {proc.poll()})")
        time.sleep(0.05)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(results: Results, elapsed: float, cpu: float, args: argparse.Namespace) -> dict[str, object]:
    total = sum(len(v) for v in results.latency.values())
    all_latency = [x for v in results.latency.values() for x in v]
    print(f"clients {args.clients}, ran {elapsed:.0f} s, {total} calls ok, {sum(results.errors.values())} errors, "
          f"{total / elapsed:.0f} calls/s, proxy CPU {cpu / max(total, 1) * 1e6:.0f} µs/call")
    print(f"{'call':36} {'count':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for key, values in sorted(results.latency.items()):
        print(f"{key:36} {len(values):8} {statistics.median(values) * 1e3:8.2f} {percentile(values, 0.99) * 1e3:8.2f} "
              f"{max(values) * 1e3:8.2f}")
    print(f"{'all':36} {total:8} {statistics.median(all_latency) * 1e3:8.2f} "
          f"{percentile(all_latency, 0.99) * 1e3:8.2f} {max(all_latency) * 1e3:8.2f}")
    print(f"event streams: {results.events} events received, errors {dict(results.stream_errors) or 'none'}")
    for error, count in results.errors.most_common(10):
        print(f"ERROR x{count}: {error}")
    warm = [r for t, r in results.rss if t >= elapsed * 0.2]
    print("proxy RSS MiB over time: " + ", ".join(f"{t:.0f}s={r:.1f}" for t, r in results.rss))
    growth = warm[-1] - warm[0] if len(warm) > 1 else 0.0
    print(f"RSS after warm-up (20% of the run): {warm[0]:.1f} -> {warm[-1]:.1f} MiB (growth {growth:+.1f} MiB); "
          f"zero errors: {'PASS' if not results.errors and not results.stream_errors else 'MISS'}")
    return {"calls": total, "errors": dict(results.errors), "elapsed_s": elapsed,
            "p99_ms": percentile(all_latency, 0.99) * 1e3, "rss": results.rss, "rss_growth_mib": growth}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--calls", type=int, default=10_000, help="calls per client (default 10000)")
    parser.add_argument("--minutes", type=float, default=5.0, help="time bound (default 5)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        shutil.copy(ROOT / "policies.yaml", work / "policies.yaml")
        (work / "policies.yaml").chmod(0o644)
        runtime = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_runtime.py"), "--listen",
                                    str(work / "runtime.sock"), "--containers", "200"], cwd=ROOT)
        procs.append(runtime)
        wait_for_socket(work / "runtime.sock", runtime)
        with (work / "proxy.log").open("wb") as log:
            proxy = subprocess.Popen([sys.executable, "-m", "criproxy", "serve", "--listen", f"unix://{work}/p.sock",
                                      "--runtime-endpoint", f"unix://{work}/runtime.sock", "--policies",
                                      str(work / "policies.yaml"), "--metrics-address", "off", "--log-level",
                                      "warning", "--max-concurrent-calls", "1000"], cwd=ROOT, stderr=log)
        procs.append(proxy)
        wait_for_socket(work / "p.sock", proxy)
        time.sleep(1)
        cpu_before = cpu_seconds(proxy.pid)
        results, elapsed = asyncio.run(drive(f"unix://{work}/p.sock", proxy.pid, args))
        summary = report(results, elapsed, cpu_seconds(proxy.pid) - cpu_before, args)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
