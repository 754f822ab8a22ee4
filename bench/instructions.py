#!/usr/bin/env python3
"""Instructions per forwarded call on the proxy's data thread, counted by callgrind.

    python bench/instructions.py [--calls 1000] [--method Version ...] [--proxy-tree DIR ...]

Timings on a shared 2-core VM move by 20% from run to run (bench/README.md); instruction counts do
not: the same build, calls and environment count a unary call the same within about 1%, whatever
else the machine is doing (a streamed event within about 10%: it depends on how the runtime's events
are batched into reads). So this is the instrument for a change to the data plane's own code or
its crates, where forwarding.py can only say "within noise".

What runs: the fake runtime (bench/fake_runtime.py), and in front of it, one after the other, the
proxy of each tree (`--proxy-tree`, default this one) under `valgrind --tool=callgrind`. For each
method (Version, ListContainers, and GetContainerEvents counted per streamed event) and each client
:authority (the kubelet's `localhost`, and grpcio's percent-encoded socket path, which the proxy
must rewrite: forwarding.py --client-authority), the client warms up, the counters are zeroed
(`callgrind_control -z`), `--calls` calls are made one after another and the counters dumped
(`callgrind_control -d`). The data thread is the dumped thread that ran the request handler
(`criproxy_native::server::handle`).

What it does not count: the kernel. System calls, copies between sockets and wake-ups are half of a
call's CPU on that VM (forwarding.py's figures); instructions are what the proxy's own code, hyper,
h2, tokio and libc cost in user space. Large copies are counted about as they cost: valgrind counts
every byte of a `rep movsb` as an instruction, so the proxy runs with glibc told never to use it
(NO_REP_MOVSB). Not a test and no targets: it prints the counts, each tree's ratio to the first, and
with --top the functions that cost most (--keep keeps the dumps for callgrind_annotate).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import forwarding as fw  # after sys.path; it settles GRPC_EXPERIMENTS before importing grpc

# isort: split
import grpc  # after forwarding, for the reason above

#: name -> (path, request, messages per call): 0 for a unary call, else a stream of that many events,
#: counted per event.
METHODS = {
    "Version": (fw.VERSION_PATH, fw.VERSION_REQUEST, 0),
    "ListContainers": (fw.LIST_CONTAINERS_PATH, fw.LIST_CONTAINERS_REQUEST, 0),
    "GetContainerEvents": (fw.EVENTS_PATH, fw.EVENTS_REQUEST, 100),
}
#: How long a proxy under valgrind may take to answer its first call (Python starts ~30x slower there).
VALGRIND_START_S = 180.0
#: Bound on each call under valgrind.
CALL_TIMEOUT_S = 30.0
#: The function that tells the data thread's dump from the other threads'.
HANDLER = "criproxy_native::server::handle"
WARMUP_CALLS = 50
#: valgrind counts each byte a `rep movsb` / `rep stosb` moves as one instruction, so glibc's memcpy and
#: memset of a few KiB and up would weigh ~30x what they cost (h2's read buffer growing by 8 KiB, four
#: times a ListContainers, counted 33,000 of its 175,000). With these thresholds out of reach glibc
#: copies with its vector loops at every size, and a copy counts about as it costs.
NO_REP_MOVSB = "glibc.cpu.x86_rep_movsb_threshold=4294967295:glibc.cpu.x86_rep_stosb_threshold=4294967295"


@dataclass(frozen=True)
class Count:
    tree: str
    method: str
    authority: str
    units: int  # calls, or for a stream the events it carried
    unit: str  # "call" or "event"
    instructions: int  # on the data thread, between zeroing and dumping
    top: list[tuple[int, str]]  # (instructions, function), costliest first

    @property
    def per_unit(self) -> float:
        return self.instructions / self.units


def callgrind_control(flag: str, pid: int) -> None:
    done = subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True, text=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {flag} {pid} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-400:]}")


def data_thread_dump(files: list[str]) -> str:
    """Of one dump's per-thread files, the data thread's: it ran the request handler (most instructions)."""
    best: tuple[int, str] | None = None
    for path in files:
        text = Path(path).read_text(errors="replace")
        if HANDLER not in text:
            continue
        total = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
        if total and (best is None or int(total.group(1)) > best[0]):
            best = (int(total.group(1)), path)
    if best is None:
        raise RuntimeError(f"no thread in {files} ran {HANDLER}: did the calls reach the proxy?")
    return best[1]


def totals_and_top(path: str, top: int) -> tuple[int, list[tuple[int, str]]]:
    out = subprocess.run(["callgrind_annotate", "--threshold=100", path], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    total = 0
    functions: Counter[str] = Counter()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in line:
            total = n
        else:  # "source:function [object]": keep the function and the object's file name
            where, _, obj = m.group(2).partition(" [")
            name = where.split(":", 1)[-1]
            obj = obj.rstrip("]").rsplit("/", 1)[-1]
            functions[f"{name} ({obj})" if obj else name] += n
    # The data thread's loop (run_plane and the frames under it) is still on the stack at the dump, and
    # callgrind gives those frames the whole count: they say nothing, so they are left out.
    costly = [(n, f) for f, n in functions.most_common() if n < total * 0.99]
    return total, costly[:top]


def caller(channel: grpc.Channel, method: str) -> tuple[Callable[[], None], str, int]:
    """(one call of `method`, bounded; what a count is per; how many of those one call makes)."""
    path, request, messages = METHODS[method]
    if not messages:
        unary = channel.unary_unary(path, None, None)
        return (lambda: unary(request, timeout=CALL_TIMEOUT_S)), "call", 1
    stream = channel.unary_stream(path, None, None)
    metadata = ((fw.MESSAGES_METADATA, str(messages)),)

    def one() -> None:
        got = sum(1 for _ in stream(request, metadata=metadata, timeout=CALL_TIMEOUT_S))
        if got != messages:
            raise RuntimeError(f"{method}: the fake runtime streamed {got} events, not {messages}")

    return one, "event", messages


def measure(tree: str, *, directory: Path, runtime_sock: str, methods: list[str], calls: int,
            top: int) -> list[Count]:
    """One proxy of `tree` under callgrind, its files in `directory`; every method with both client
    authorities."""
    directory.mkdir()
    sock = f"{directory}/proxy.sock"
    out = directory / "cg.out"
    valgrind = shutil.which("valgrind") or "valgrind"  # checked in main(); the launcher needs a path
    argv = [valgrind, "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
            sys.executable, "-m", "criproxy", "serve", "--listen", f"unix://{sock}",
            "--runtime-endpoint", f"unix://{runtime_sock}", "--metrics-address", "off"]
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), NO_REP_MOVSB) if t)
    child = fw.Child(f"proxy of {tree} under callgrind", argv, env, directory / "proxy.log", cwd=tree)
    results: list[Count] = []
    try:
        fw.wait_answering(f"unix://{sock}", child, timeout=VALGRIND_START_S)
        for authority, options in fw.CLIENT_AUTHORITIES.items():
            with grpc.insecure_channel(f"unix://{sock}", options=[*fw.CHANNEL_OPTIONS, *options]) as channel:
                for method in methods:
                    call, unit, per_call = caller(channel, method)
                    unary = unit == "call"
                    made = calls if unary else max(1, calls // 10)  # a stream's call carries many events
                    for _ in range(WARMUP_CALLS if unary else 2):
                        call()
                    callgrind_control("-z", child.pid)
                    before = set(glob.glob(f"{out}*"))
                    for _ in range(made):
                        call()
                    callgrind_control("-d", child.pid)
                    dumped = sorted(set(glob.glob(f"{out}*")) - before)
                    total, functions = totals_and_top(data_thread_dump(dumped), top)
                    count = Count(tree, method, authority, made * per_call, unit, total, functions)
                    results.append(count)
                    fw.progress(f"{tree}: {method}, {authority} authority: "
                                f"{count.per_unit:,.0f} instructions/{unit}")
    finally:
        child.stop()
    return results


def report(counts: list[Count], top: int) -> None:
    first: dict[tuple[str, str], Count] = {}  # the first tree's count of each method and authority
    for c in counts:
        first.setdefault((c.method, c.authority), c)
    print(f"\n{'method':<20} {'client :authority':<18} {'tree':<40} {'instructions':>14} {'per':<6} {'ratio':>6}")
    for c in counts:
        ratio = c.per_unit / first[(c.method, c.authority)].per_unit
        print(f"{c.method:<20} {c.authority:<18} {c.tree[-40:]:<40} {c.per_unit:>14,.0f} {c.unit:<6} {ratio:>5.2f}x")
    if top:
        for c in counts:
            print(f"\n{c.method}, {c.authority} authority, {c.tree}: the {top} costliest functions, per {c.unit}")
            for n, name in c.top:
                print(f"  {n / c.units:>10,.0f}  {name[:150]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000,
                        help="calls counted per method and authority (GetContainerEvents: a tenth as many streams of "
                             "100 events each, counted per event)")
    parser.add_argument("--method", action="append", choices=sorted(METHODS), default=[],
                        help="methods to count (default: all); repeatable")
    parser.add_argument("--proxy-tree", action="append", default=[], metavar="DIR",
                        help="count the proxy of this copy of the source tree too (the first is the baseline; "
                             "default: this tree)")
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest functions of each count")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory with callgrind's dumps (for callgrind_annotate)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls {args.calls}: must be at least 1")
    if args.top < 0:
        parser.error(f"--top {args.top}: must be 0 (no list) or more")
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt-get install valgrind)")
    trees = [os.path.abspath(t) for t in args.proxy_tree] or [fw.ROOT]
    for tree in trees:
        if not os.path.isfile(os.path.join(tree, "criproxy", "__init__.py")):
            parser.error(f"--proxy-tree {tree}: no criproxy package there")
    methods = args.method or list(METHODS)
    workdir = Path(tempfile.mkdtemp(prefix="crii-", dir="/tmp"))
    runtime_sock = f"{workdir}/runtime.sock"
    runtime = fw.Child("fake runtime", [sys.executable, os.path.join(fw.ROOT, "bench", "fake_runtime.py"),
                                        "--listen", runtime_sock], dict(os.environ), workdir / "runtime.log")
    began = time.monotonic()
    counts: list[Count] = []
    try:
        fw.wait_answering(f"unix://{runtime_sock}", runtime)
        for i, tree in enumerate(trees):
            counts += measure(tree, directory=workdir / f"tree{i}", runtime_sock=runtime_sock, methods=methods,
                              calls=args.calls, top=args.top)
    finally:
        runtime.stop()
        if args.keep:
            print(f"callgrind's dumps are kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(counts, args.top)
    print(f"\n{len(counts)} counts in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
