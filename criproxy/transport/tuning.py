"""Process-wide tuning the proxy applies once at start: glibc malloc parameters.

Why: every large CRI answer (ListContainers of 1,000 containers is ~1 MB; ListImages and
ListPodSandbox on a busy node are alike) crosses the proxy as several short-lived buffers of its
size: gRPC's receive slices, the Python bytes, the send slice. With glibc's defaults, freeing them
leaves a large free block at the top of the heap, which glibc hands back to the kernel (trim), and
the next call faults the same pages in again, zero-filled: strace shows the heap grow by ~2.7 MB
and shrink back on every ListContainers call; bench/forwarding.py counts ~640 minor page faults per
call in the proxy and 3-4 ms of proxy CPU per call, over half of it in the kernel's page-fault path
(perf: exc_page_fault and clear_page_erms under memmove).

What, all with mallopt(3):
- M_TOP_PAD (MALLOC_TOP_PAD): keep that much free memory at the top of the heap when trimming, so
  a call's buffers reuse pages already mapped.
- M_MMAP_THRESHOLD (MALLOC_MMAP_THRESHOLD): needed with it, because mallopt(M_TOP_PAD) also turns
  glibc's dynamic mmap threshold off (the GLIBC_TUNABLES top_pad does not), leaving it at 128 KiB:
  every 1 MB buffer would get its own mapping and fault all its pages in (measured: 257 faults per
  1 MiB malloc/free). Buffers above it (answers over 4 MiB; the limit is --max-message-bytes,
  16 MiB by default) still get their own mapping and go straight back to the kernel.
- M_ARENA_MAX (MALLOC_ARENA_MAX): one arena, so the pad is kept once, not once per gRPC thread.

Measured effect (bench/forwarding.py, full runs on a 2-core VM, the untuned proxy and this one in
the same run, interleaved; two runs): ListContainers page faults per call 643 -> 10 and 643 -> 8,
proxy CPU per call 4150 -> 1850 us and 3125 -> 1300 us (gRPC's own floor: the runtime's plus a
client's CPU per call is 1250-1850 us there), p50 4.24x -> 2.48x and 4.31x -> 2.44x direct; proxy
RSS after three 64-client bursts 86.0 -> 66.5 MiB and 109.7 -> 71.7 MiB (target 80). Version: no
change (its messages are small). Also measured (RSS after 3 bursts, 4 runs each of a 64-client
burst script): the pad without an arena limit 91 MiB on average, 10 arenas after the bursts;
arena limit 2: 72 MiB; limit 1: 68 MiB, the same as untuned glibc (68 MiB, 9 runs).

Once serving, `release_start_up_memory` hands back to the kernel the heap pages that start-up
(imports, protobuf descriptors, the config and policy parsing, the first calls to the runtime) used
and freed, which glibc keeps because they are not at the top of the heap: malloc_trim(3), once.
Measured (`criproxy serve` in front of bench/fake_runtime.py, three starts): RSS 53.3-53.5 ->
50.4-50.5 MiB, in 0.4-0.5 ms.

An operator's own allocator settings win: with a `glibc.malloc.*` GLIBC_TUNABLES entry, any
MALLOC_* environment variable glibc reads, or another allocator preloaded (jemalloc, tcmalloc,
mimalloc), nothing is changed. Elsewhere than glibc (musl, macOS) this is a no-op. It never raises.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: Bytes glibc keeps at the top of the heap when it trims (and adds whenever it grows it): room for
#: one large answer's buffers to be reused call after call. With the grpc.aio relay (Python held
#: every answer, the heap grew by ~2.7 MB per ListContainers) 4 MiB was needed (faults per call with
#: 2 MiB: 244). Since the native data plane carries answers as HTTP/2 frames, 2 MiB is enough.
#: Measured (bench/forwarding.py --quick, the same run, GLIBC_TUNABLES variants beside this one):
#: ListContainers page faults per call 0 with 4 MiB and with 2 MiB, proxy CPU per call 529 and 535 us
#: (447 and 458 in another run; 1 MiB: 523, none: 873); peak RSS after 64 clients 71.3 -> 66.0 MiB
#: (69.2 -> 64.8; 1 MiB: 65.3, none: 62.4).
MALLOC_TOP_PAD = 2 << 20
#: Allocations at least this large get their own mapping (released at once when freed); smaller
#: ones come from the heap. Must be set explicitly: mallopt(M_TOP_PAD) turns the dynamic
#: threshold off, leaving 128 KiB.
MALLOC_MMAP_THRESHOLD = 4 << 20
#: At most this many malloc arenas. glibc gives each thread that meets a busy arena its own (up to
#: 8 per CPU), and each keeps its own top pad: with gRPC's threads, 10 arenas after a 64-client
#: burst, RSS after it 91 MiB on average (4 runs) instead of 68 MiB. The proxy allocates mostly on
#: the event loop's thread and gRPC's poller thread; one arena cost no measurable CPU or latency
#: (Version and ListContainers p50 and CPU per call, burst duration: within run-to-run noise).
MALLOC_ARENA_MAX = 1
#: It only holds if set while the process has one thread (see tune_process). Until it was (the main
#: log's writer thread started first), the data plane's thread had an arena of its own. Measured
#: (64 clients reading two ListContainers each, twice, one proxy after the other): peak RSS 65 -> 62
#: MiB, RSS once they are done 58-59 -> 52 MiB (the RSS before them: 52 MiB).

# mallopt(3) parameter numbers (malloc.h).
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def glibc_version() -> str | None:
    """'2.36' under glibc, else None."""
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None
    if not value or not value.startswith("glibc "):
        return None
    return value.split(" ", 1)[1]


def operator_tuned(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the allocator is the operator's business (their own settings or allocator); None if not."""
    env = os.environ if environ is None else environ
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return "GLIBC_TUNABLES sets glibc.malloc.* tunables"
    for name in env:
        if name.startswith("MALLOC_"):  # MALLOC_ARENA_MAX, MALLOC_TOP_PAD_, ...: glibc reads them itself
            return f"{name} is set"
    return preloaded_allocator(env)


def preloaded_allocator(environ: Mapping[str, str] | None = None) -> str | None:
    """'LD_PRELOAD=...' when another allocator than glibc's is preloaded; None if not."""
    preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
    if any(allocator in preload for allocator in _OTHER_ALLOCATORS):
        return f"LD_PRELOAD={preload}"
    return None


def tune_process() -> str:
    """Set the malloc parameters above in this process (glibc only; never raises); what was done, to log.

    Call it once, first thing in `criproxy serve`, before any other thread exists: glibc fixes its
    arena limit when a second thread first allocates, so M_ARENA_MAX set after that (even after the
    log writer's thread started) leaves every later thread free to get an arena of its own. Logging
    may not be set up yet, hence the returned line."""
    try:
        return _tune()
    except Exception as err:  # tuning is an optimisation: never stop the proxy from starting
        return f"malloc tuning skipped: {err!r}"


MIB = 1 << 20


def resident_bytes() -> int:
    """This process's resident set now (/proc/self/statm); 0 where there is no /proc."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_start_up_memory() -> str:
    """Hand free heap pages back to the kernel (glibc's malloc_trim(3)), once start-up is over; what
    was done, to log. Never raises. Elsewhere than glibc, or with another allocator preloaded, a no-op."""
    try:
        if glibc_version() is None:
            return "not glibc: start-up memory left as is"
        preloaded = preloaded_allocator()
        if preloaded is not None:
            return f"start-up memory left to the allocator of {preloaded}"
        trim = ctypes.CDLL(None).malloc_trim
        trim.argtypes = (ctypes.c_size_t,)
        trim.restype = ctypes.c_int
        before = resident_bytes()
        trim(0)
        after = resident_bytes()
        return f"start-up memory handed back: resident {before / MIB:.1f} -> {after / MIB:.1f} MiB"
    except Exception as err:  # an optimisation: never stop the proxy
        return f"start-up memory left as is: {err!r}"


def _tune() -> str:
    version = glibc_version()
    if version is None:
        return "not glibc: malloc left as is"
    reason = operator_tuned()
    if reason is not None:
        return f"malloc left as the operator set it: {reason}"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (("M_ARENA_MAX", _M_ARENA_MAX, MALLOC_ARENA_MAX),
                ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
                ("M_TOP_PAD", _M_TOP_PAD, MALLOC_TOP_PAD))
    refused = [name for name, param, value in settings if mallopt(param, value) != 1]
    done = f"glibc {version} malloc tuned: " + ", ".join(f"{name}={value}" for name, _, value in settings)
    return done + (f" (refused by glibc: {', '.join(refused)})" if refused else "")
