"""Long-lived background tasks that outlive their own bugs.

The proxy's control plane runs a few coroutines for as long as it serves: the runtime's state
watcher, the policy file's watcher and its reloader. Left alone, one unexpected exception ends
such a task without a word, and the proxy goes on serving with part of its control plane gone.
A Supervisor runs each under a name: it logs a failure with its traceback, counts it
(`on_failure`, e.g. a metric), starts the coroutine again after a short backoff, and says which
tasks are failing (for /readyz) until a restarted task has run for HEALTHY_AFTER_S.
`stop_tasks` ends such tasks when the proxy stops, without ever waiting on one for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: The first restart waits this long, each further one twice as long, up to BACKOFF_MAX_S.
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0
#: A restarted task that ran this long without failing is healthy again (and its backoff starts over).
HEALTHY_AFTER_S = 10.0
#: How long stopping waits for a cancelled background task to end before it goes on without it.
STOP_WAIT_S = 2.0


@dataclass
class TaskStatus:
    failures: int = 0
    last_error: str | None = None
    #: time.monotonic() when the current run began; None while waiting to restart.
    running_since: float | None = None


class Supervisor:
    """Runs named long-lived coroutines, restarting each when it fails or ends."""

    def __init__(self, on_failure: Callable[[str], None] | None = None) -> None:
        self.on_failure = on_failure
        self.tasks: dict[str, TaskStatus] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `run()` under `name` until the returned task is cancelled."""
        self.tasks[name] = TaskStatus()
        return asyncio.get_running_loop().create_task(self._supervise(name, run), name=name)

    def failing(self) -> dict[str, str]:
        """The tasks failing now (failed, and not yet healthy again): name -> what went wrong."""
        now = time.monotonic()
        return {name: f"{s.last_error} ({s.failures} failure{'s' if s.failures != 1 else ''})"
                for name, s in self.tasks.items()
                if s.last_error is not None and (s.running_since is None or now - s.running_since < HEALTHY_AFTER_S)}

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        status = self.tasks[name]
        backoff = BACKOFF_INITIAL_S
        while True:
            began = status.running_since = time.monotonic()
            if status.failures:
                log.info("background task %s restarted", name)
            try:
                await run()
            except Exception as err:
                what = f"{type(err).__name__}: {err}"
                log.error("background task %s failed (restarting it in %.1f s): %s", name, backoff, what,
                          exc_info=True)
            else:
                what = "it ended"
                log.error("background task %s ended, which it should not (restarting it in %.1f s)", name, backoff)
            status.failures += 1
            status.last_error, status.running_since = what, None
            self._count(name)
            if time.monotonic() - began >= HEALTHY_AFTER_S:
                backoff = BACKOFF_INITIAL_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _count(self, name: str) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(name)
        except Exception:
            log.exception("counting the failure of background task %s failed", name)


async def stop_tasks(tasks: Iterable[asyncio.Task[None] | None], owner: str, wait: float = STOP_WAIT_S) -> None:
    """Cancel `tasks` (None is skipped) and wait for them to end, `wait` seconds at most. One still
    running then has kept its cancellation (a bug, as in Python 3.11's wait_for): it is logged with
    its name and `owner`, and left behind, so that stopping goes on instead of hanging on it."""
    given = [task for task in tasks if task is not None]
    for task in given:
        task.cancel()  # (nothing, for one that has ended)
    running = [task for task in given if not task.done()]
    stuck: set[asyncio.Task[None]] = set()
    if running:
        _, stuck = await asyncio.wait(running, timeout=wait)
    for task in given:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not report it again at exit
    for task in stuck:
        log.error("%s: background task %s did not end within %g s of being cancelled; stopping without it "
                  "(a bug in criproxy: please report it)", owner, task.get_name(), wait)
