"""Replay benchmark: records per second of `criproxy replay`, on one core and on all, and its peak memory.

    python bench/replay.py [--records N] [--nodes N] [--templates N] [--distinct N] [--jobs N]

Makes a fleet's day of recordings, then times `criproxy replay` on it (a real process, as CI runs it):

- The records are written by the live path: a Pipeline with the built-in interceptors under a policy
  (OLD), its on_decided sink a real Recorder, fed the RunPodSandbox, CreateContainer (one to three
  containers) and UpdateContainerResources requests of `--templates` workloads in 300 namespaces: most
  without criproxy annotations, a third with memory, CPU or seccomp annotations, some denied. Every
  record of a pod is one of those templates' lines with the pod's name, uid, node and time put in, so
  the file holds exactly what `serve --record` writes. `--nodes` files (one per node, a day's worth
  each), `--records` lines in all. Cached under /tmp/criproxy-bench-replay/ by their parameters.
- The new policy (NEW) lowers the memory limit of one team in ten from 8Gi to 1Gi: about 2% of the
  pods become newly denied, so the comparison and the report are exercised, not only the look-up.
- `criproxy replay --policies NEW -o json` runs with --jobs 1 and with every core; wall time, records
  per second, and the peak resident memory of the whole process tree (sampled every 20 ms from
  /proc). Then once more on `--distinct` records that are all different decision inputs (every pod its
  own memory-limit value): the worst case, where no verdict is shared and each record is decided.

The figure the issue sets: at least 50,000 records/s per core. Not a test: it prints figures and
PASS/MISS, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from criproxy.api.runtime.v1 import api_pb2  # noqa: E402
from criproxy.cri.annotations import Lookup  # noqa: E402
from criproxy.cri.context import CREATE_CONTAINER, RUN_POD_SANDBOX, UPDATE_CONTAINER_RESOURCES, RuntimeFacts  # noqa: E402
from criproxy.cri.methods import METHODS  # noqa: E402
from criproxy.errors import CriProxyError  # noqa: E402
from criproxy.interceptors import build_interceptors  # noqa: E402
from criproxy.observe.record import Recorder  # noqa: E402
from criproxy.pipeline import Pipeline  # noqa: E402
from criproxy.pipeline.index import ContainerInfo, pod_info  # noqa: E402
from criproxy.policies.store import load_policy  # noqa: E402
from criproxy.seam import Call  # noqa: E402

TARGET_PER_CORE = 50_000
CACHE = Path("/tmp/criproxy-bench-replay")
NAME, UID, NODE, TIME = "zzpodnamezz", "zzpoduidzz", "zznodezz", "2026-11-28T00:00:00.000Z"
NAMESPACES = 300
HEADER = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nmode: enforce\ndrift: deny\nrules:\n"
SYSTEM = "  - name: system\n    namespaces: [kube-system, kube-public, criproxy-system]\n    settings: {}\n"


def policy(strict_teams: int) -> str:
    """Teams team-000..team-299; the first `strict_teams` in every ten get 1Gi instead of 8Gi."""
    strict = [f"team-{i:03d}" for i in range(NAMESPACES) if i % 10 < strict_teams]
    rules = [SYSTEM]
    if strict:
        rules.append(f"  - name: strict-teams\n    namespaces: [{', '.join(strict)}]\n    settings:\n"
                     "      memory-limit: {max: 1Gi}\n      cpu-quota: {max: \"8\"}\n"
                     "      seccomp-profile: {values: [runtime/default]}\n")
    rules.append("  - name: teams\n    namespaces: [\"team-*\"]\n    settings:\n      memory-limit: {max: 8Gi}\n"
                 "      cpu-quota: {max: \"8\"}\n      seccomp-profile: {values: [runtime/default]}\n")
    rules.append("  - name: tenants\n    namespaces: [\"tenant-*\"]\n    settings:\n"
                 "      runtime-handler: {values: [kata], default: kata}\n"
                 "      seccomp-profile: {values: [runtime/default], default: runtime/default}\n")
    return HEADER + "".join(rules)


def template_pods(count: int, rng: random.Random, *, distinct: bool = False) -> list[dict]:
    pods = []
    for i in range(count):
        namespace = f"team-{rng.randrange(NAMESPACES):03d}" if rng.random() < 0.9 else f"tenant-{rng.randrange(20)}"
        annotations = {"kubernetes.io/config.source": "api", "kubectl.kubernetes.io/last-applied-configuration":
                       "{" + "x" * rng.randrange(200, 2000) + "}"}
        kind = rng.random()
        if distinct:
            annotations["memory-limit.criproxy.io/pod"] = f"{512 + i}Mi"
        elif kind < 0.12:
            annotations["memory-limit.criproxy.io/pod"] = rng.choice(["512Mi", "768Mi", "2Gi", "3Gi", "6Gi"])
        elif kind < 0.22:
            annotations["cpu-quota.criproxy.io/pod"] = rng.choice(["500m", "1", "2"])
            annotations["memory-limit.criproxy.io/container.app"] = rng.choice(["256Mi", "1536Mi"])
        elif kind < 0.30:
            annotations["seccomp-profile.criproxy.io/pod"] = "runtime/default"
        elif kind < 0.32:
            annotations["memory-limit.criproxy.io/pod"] = "16Gi"  # over every limit: denied by OLD too
        containers = ["app", "sidecar", "init"][:rng.choice([1, 1, 2, 3])]
        memory = rng.choice([1, 2, 4, 8]) << 30
        pods.append({"namespace": namespace, "labels": {"app": f"w{i}", "pod-template-hash": f"{i:08x}",
                                                        "team": namespace},
                     "annotations": annotations, "containers": containers, "memory": memory,
                     "update": rng.random() < 0.1})
    return pods


def requests_of(pod: dict) -> list[tuple[str, object]]:
    sandbox = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name=NAME, uid=UID,
                                                                           namespace=pod["namespace"]),
                                       labels=pod["labels"], annotations=pod["annotations"])
    out: list[tuple[str, object]] = [(RUN_POD_SANDBOX, api_pb2.RunPodSandboxRequest(config=sandbox))]
    for name in pod["containers"]:
        config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name),
                                         command=["/app", "--serve"], envs=[api_pb2.KeyValue(key="A", value=b"1")])
        config.linux.resources.CopyFrom(api_pb2.LinuxContainerResources(
            cpu_period=100_000, cpu_quota=400_000, cpu_shares=2048, memory_limit_in_bytes=pod["memory"],
            memory_swap_limit_in_bytes=pod["memory"], oom_score_adj=-997))
        out.append((CREATE_CONTAINER, api_pb2.CreateContainerRequest(pod_sandbox_id="sb", config=config,
                                                                    sandbox_config=sandbox)))
    if pod["update"]:
        out.append((UPDATE_CONTAINER_RESOURCES, api_pb2.UpdateContainerResourcesRequest(
            container_id="c-app", linux=api_pb2.LinuxContainerResources(
                cpu_period=100_000, cpu_quota=200_000, cpu_shares=1024, memory_limit_in_bytes=pod["memory"] // 2,
                memory_swap_limit_in_bytes=pod["memory"] // 2))))
    return out


def record_templates(pods: list[dict], old: Path, path: Path) -> list[list[str]]:
    """Each pod's records, written by a real Recorder on the live path (Pipeline.before)."""
    lookup = Lookup()
    recorder = Recorder(path, node=NODE, domain=lookup.domain, capacity=1 << 20)
    pipeline = Pipeline(build_interceptors(None, {}, lookup, "bench"), lookup=lookup, on_decided=recorder,
                        on_decisions=lambda *_: None)
    pipeline.policy = load_policy(old, lookup)
    pipeline.facts = RuntimeFacts(frozenset({"runc", "kata"}), "the runtime's Status.runtime_handlers")
    counts = []

    async def run() -> None:
        for pod in pods:
            sent = 0
            for key, request in requests_of(pod):
                if key == RUN_POD_SANDBOX:
                    s = request.config  # type: ignore[attr-defined]
                if key == CREATE_CONTAINER:
                    s = request.sandbox_config  # type: ignore[attr-defined]
                    info = pod_info(s.metadata, s.labels, s.annotations)
                    pipeline.index.add_container("c-app", ContainerInfo("sb", "app", info))
                with contextlib.suppress(CriProxyError):  # a denied call is recorded all the same
                    await pipeline.before(Call(METHODS[key], "/runtime.v1." + key, ()), request)  # type: ignore[arg-type]
                sent += 1
                if key == RUN_POD_SANDBOX:  # the sandbox as the runtime keeps it: with the pinned annotations
                    pipeline.index.add_sandbox("sb", pod_info(s.metadata, s.labels, request.config.annotations))  # type: ignore[attr-defined]
            counts.append(sent)

    asyncio.run(run())
    recorder.close()
    assert recorder.dropped == 0
    prefix = '{"v":1,"time":"'
    lines = [line[:len(prefix)] + TIME + line[len(prefix) + len(TIME):] for line in path.read_text().splitlines()]
    assert all(line.startswith(prefix + TIME + '"') for line in lines)
    out, at = [], 0
    for n in counts:
        out.append(lines[at:at + n])
        at += n
    assert at == len(lines), (at, len(lines))
    return out


def generate(args: argparse.Namespace, where: Path, *, distinct: bool) -> tuple[list[Path], int]:
    """The recording files (cached), and how many records they hold."""
    records = args.distinct if distinct else args.records
    nodes = 1 if distinct else args.nodes
    key = f"{'distinct' if distinct else 'fleet'}-{records}-{nodes}-{args.templates}-{args.seed}"
    directory = where / key
    done = directory / "done"
    if done.exists():
        return sorted(directory.glob("node-*.jsonl")), int(done.read_text())
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    templates = record_templates(template_pods(records // 2 if distinct else args.templates, rng, distinct=distinct),
                                 where / "old.yaml", directory / "templates.jsonl")
    cumulative, total = [], 0.0
    for _ in templates:  # a few big workloads, a long tail
        total += rng.paretovariate(1.2)
        cumulative.append(total)
    per_node = records // nodes
    written = 0
    start = time.time()
    files = []
    serial = 0
    for n in range(nodes):
        path = directory / f"node-{n:04d}.jsonl"
        files.append(path)
        node = f"node-{n:04d}"
        with path.open("w") as f:
            count = 0
            chosen = iter(range(len(templates)) if distinct else rng.choices(range(len(templates)),
                                                                             cum_weights=cumulative, k=per_node))
            while count < per_node:
                i = next(chosen, None)
                if i is None:
                    break
                serial += 1
                name, uid = f"w{i}-{serial:x}", f"{serial:08x}-0000-4000-8000-{n:012x}"
                when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + count * 86400 / per_node))
                for line in templates[i]:
                    f.write(line.replace(NAME, name).replace(UID, uid).replace(NODE, node).replace(
                        TIME, f"{when}.000Z", 1) + "\n")
                    count += 1
            written += count
    done.write_text(str(written))
    return files, written


class Peak:
    """The peak resident memory of a process and its descendants, sampled from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0

    def tree(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo and len(out) < 4096:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return out

    def sample(self) -> None:
        total = 0
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                continue
        self.peak = max(self.peak, total)


def run_replay(files: list[Path], new: Path, jobs: int, out: Path) -> tuple[float, float, int, int]:
    """(seconds, CPU seconds of the process tree, exit status, peak bytes) of `criproxy replay` over the files."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    errors = out.with_suffix(".stderr")
    with out.open("w") as stdout, errors.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "criproxy", "replay", "--policies", str(new), "-o", "json",
                                 "--jobs", str(jobs), str(files[0].parent / "node-*.jsonl")], stdout=stdout,
                                stderr=stderr, cwd=ROOT)
        peak = Peak(proc.pid)
        deadline = started + 3600
        while proc.poll() is None and time.monotonic() < deadline:
            peak.sample()
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the replay and its workers (it reaps them)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode not in (0, 1):
        raise SystemExit(f"criproxy replay failed ({proc.returncode}): {errors.read_text()}")
    return elapsed, cpu, proc.returncode, peak.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=5000, help="files, one per node (default 5000)")
    parser.add_argument("--templates", type=int, default=3000, help="distinct workloads (default 3000)")
    parser.add_argument("--distinct", type=int, default=50_000, help="records of the worst case (0: skip it)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="for the 'all cores' run")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    old, new = CACHE / "old.yaml", CACHE / "new.yaml"
    old.write_text(policy(0))
    new.write_text(policy(1))
    for path in (old, new):
        path.chmod(0o644)
    started = time.monotonic()
    files, count = generate(args, CACHE, distinct=False)
    size = sum(f.stat().st_size for f in files)
    print(f"recordings: {count} records in {len(files)} files, {size / 2**20:.0f} MiB "
          f"({size / count:.0f} bytes a record); made or found in {time.monotonic() - started:.0f} s")
    report = CACHE / "report.json"
    rows = []
    for jobs in dict.fromkeys((1, args.jobs)):
        elapsed, cpu, status, peak = run_replay(files, new, jobs, report)
        summary = json.loads(report.read_text())["summary"]
        rows.append((f"fleet, --jobs {jobs}", count, elapsed, cpu, peak))
        print(f"  --jobs {jobs}: exit {status}, {summary['calls']} calls, {summary['pods']} pods, "
              f"{summary['kinds']['newly-denied']['pods']} pods newly denied")
    if args.distinct:
        files, count = generate(args, CACHE, distinct=True)
        for jobs in dict.fromkeys((1, args.jobs)):
            elapsed, cpu, _, peak = run_replay(files, new, jobs, report)
            rows.append((f"all distinct, --jobs {jobs}", count, elapsed, cpu, peak))
    print(f"\n{'run':<28} {'records':>10} {'seconds':>8} {'records/s':>10} {'CPU s':>8} {'per CPU s':>10} "
          f"{'peak RSS':>10}")
    for name, n, elapsed, cpu, peak in rows:
        print(f"{name:<28} {n:>10} {elapsed:>8.1f} {n / elapsed:>10.0f} {cpu:>8.1f} {n / cpu:>10.0f} "
              f"{peak / 2**20:>8.0f} MiB")
    print("(records per CPU second: what one core does, whatever else the machine runs; seconds include start-up)")
    one = rows[0]
    rate = one[1] / one[3]
    verdict = "PASS" if rate >= TARGET_PER_CORE else "MISS"
    print(f"\ntarget: at least {TARGET_PER_CORE} records/s per core (--jobs 1, per CPU second): {verdict} ({rate:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
