"""criproxy.transport.tuning: the malloc settings apply under glibc, and an operator's own choice wins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from criproxy.transport import tuning

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("environ", "reason"), [
    ({}, None),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1024"}, None),
    ({"GLIBC_TUNABLES": "glibc.malloc.top_pad=1"}, "GLIBC_TUNABLES sets glibc.malloc.* tunables"),
    ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX is set"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD=/usr/lib/libjemalloc.so.2"),
], ids=["nothing", "other-tunables", "malloc-tunables", "malloc-env", "jemalloc"])
def test_the_operators_allocator_settings_win(environ: dict[str, str], reason: str | None) -> None:
    assert tuning.operator_tuned(environ) == reason


def tuning_log(extra_env: dict[str, str]) -> str:
    """What serve's start logs of the tuning, in a fresh interpreter (the effect on page faults is
    bench/forwarding.py's)."""
    code = ("from criproxy.cli import start_process\n"
            "main_log = start_process('DEBUG')\n"
            "main_log.stop()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **extra_env}, check=True)
    return done.stderr


#: In a fresh interpreter: serve's process setup, then a thread that allocates while the main thread
#: does too (so it cannot simply borrow the main arena), then glibc's own count of its arenas.
ARENAS = """
import ctypes, sys, threading
from criproxy.cli import start_process
main_log = start_process("INFO")
stop = threading.Event()
def churn():
    while not stop.is_set():
        [bytearray(4096) for _ in range(200)]
worker = threading.Thread(target=churn)
worker.start()
for _ in range(2000):
    [bytearray(4096) for _ in range(200)]
stop.set(); worker.join()
main_log.stop()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()
"""


@pytest.mark.skipif(tuning.glibc_version() is None, reason="not glibc")
def test_glibc_is_tuned_unless_the_operator_chose() -> None:
    assert (f"malloc tuned: M_ARENA_MAX={tuning.MALLOC_ARENA_MAX}, M_MMAP_THRESHOLD={tuning.MALLOC_MMAP_THRESHOLD}, "
            f"M_TOP_PAD={tuning.MALLOC_TOP_PAD}") in tuning_log({})
    assert tuning.MALLOC_TOP_PAD == 2 << 20  # the measured choice (see tuning.py)
    assert "malloc left as the operator set it: MALLOC_ARENA_MAX is set" in tuning_log({"MALLOC_ARENA_MAX": "8"})


@pytest.mark.skipif(tuning.glibc_version() is None, reason="not glibc")
def test_threads_started_after_serves_setup_share_the_one_arena() -> None:
    # glibc fixes its arena limit when a second thread first allocates: tuning after the log writer's
    # thread started left every later thread (the data plane's included) an arena of its own.
    done = subprocess.run([sys.executable, "-c", ARENAS], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin"}, check=True)
    arenas = [line for line in done.stderr.splitlines() if line.startswith("Arena ")]
    assert arenas == ["Arena 0:"], done.stderr


#: In a fresh interpreter, tuned as serve is: 64 MiB of heap blocks freed but for every eighth one,
#: so the heap cannot shrink from its top; then the hand-back.
HOLES = """
import sys
from criproxy.transport import tuning
print(tuning.tune_process(), file=sys.stderr)
blocks = [bytearray(16 << 10) for _ in range(4096)]
kept = blocks[7::8]
del blocks
before = tuning.resident_bytes()
print(tuning.release_start_up_memory(), file=sys.stderr)
print(before, tuning.resident_bytes())
"""


@pytest.mark.skipif(tuning.glibc_version() is None, reason="not glibc")
def test_start_up_memory_freed_in_the_middle_of_the_heap_goes_back_to_the_kernel() -> None:
    done = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin"}, check=True)
    before, after = (int(n) for n in done.stdout.split())
    assert before - after > 40 << 20, done.stderr  # 56 of the 64 MiB were free, between kept blocks
    assert f"start-up memory handed back: resident {before / tuning.MIB:.1f} -> " in done.stderr


def test_start_up_memory_is_left_to_a_preloaded_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    if tuning.glibc_version() is None:
        pytest.skip("not glibc")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert tuning.release_start_up_memory() == (
        "start-up memory left to the allocator of LD_PRELOAD=/usr/lib/libjemalloc.so.2")
