"""Log records written by a background thread, so no call ever waits on a log file or stderr.

The event loop that serves every CRI call also logs. A slow or stalled destination (a full
stderr pipe, journald under pressure, a decision-log file on a busy disk, its rotation) must
not stall it: loggers get a QueueHandler in front of a bounded queue, and a QueueListener thread
does the writing. When the queue is full the record is dropped and counted, never waited for.
`stop()` writes out whatever was queued before it, so nothing logged before a stop is lost.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

#: Records that may wait for the writer thread; past it they are dropped (and counted).
DEFAULT_CAPACITY = 10_000

#: How long stop() waits for the writer to write out what is queued; a destination stuck for good
#: (a pipe nobody reads) must not keep the process from exiting.
FLUSH_TIMEOUT_S = 5.0

#: How long the writer lets records gather before it writes the next ones: calls come in bursts (a
#: pod's containers, a node's restart), and waking the writer thread for each line (a thread switch
#: and the GIL handed over, each time) cost the loop more than the lines themselves. The first record after a quiet
#: spell is written at once; those right behind it wait this long at most.
WRITE_LINGER_S = 0.05

#: Told of dropped records: (the log's name, how many more were dropped).
DropListener = Callable[[str, int], None]


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    def __init__(self, records: queue.Queue[logging.LogRecord], owner: BackgroundLog) -> None:
        super().__init__(records)
        self.owner = owner

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.owner.count_drop()


class _Writer(logging.handlers.QueueListener):
    def __init__(self, records: queue.Queue[Any], destination: logging.Handler) -> None:
        super().__init__(records, destination, respect_handler_level=True)
        self.records = records  # records, then the sentinel

    def dequeue(self, block: bool) -> Any:
        if block and self.records.empty():
            time.sleep(WRITE_LINGER_S)  # see WRITE_LINGER_S: one wake-up writes what gathered
        return self.records.get(block)

    def enqueue_sentinel(self) -> None:
        # Behind every queued record, waiting for room (the queue may be full); bounded.
        self.records.put(getattr(self, "_sentinel", None), timeout=FLUSH_TIMEOUT_S)

    def stop(self) -> None:
        """Write out what is queued, then end the thread: both bounded by FLUSH_TIMEOUT_S."""
        try:
            self.enqueue_sentinel()
        except queue.Full:
            return  # stuck destination: leave the (daemon) thread
        if self._thread is not None:
            self._thread.join(FLUSH_TIMEOUT_S)
            self._thread = None


class BackgroundLog:
    """`handler` (to add to loggers) queues records; a thread hands them to `destination`."""

    def __init__(self, name: str, destination: logging.Handler, *, capacity: int = DEFAULT_CAPACITY) -> None:
        self.name = name
        self.destination = destination
        self.records: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=capacity)
        self._queueing = _DroppingQueueHandler(self.records, self)
        self.handler: logging.Handler = self._queueing
        self.dropped = 0
        self._lock = threading.Lock()
        self._on_drop: DropListener | None = None
        self._listener = _Writer(self.records, destination)
        self._listener.start()
        self._running = True

    @property
    def on_drop(self) -> DropListener | None:
        return self._on_drop

    @on_drop.setter
    def on_drop(self, listener: DropListener | None) -> None:
        """Set the listener; it is told at once of the records dropped before it was set."""
        with self._lock:
            self._on_drop, earlier = listener, self.dropped
        if listener is not None and earlier:
            listener(self.name, earlier)

    def submit(self, message: object) -> None:
        """Queue `message` as a record of its own, without formatting it here: the destination takes its str()
        on the writer thread (lines whose encoding should not cost the caller). Dropped and counted when the
        queue is full, like any record. The record carries only its name, level and message (a full LogRecord
        costs the caller more than the rest of this): for a destination that writes `record.msg` itself, such
        as the recording's file (criproxy.observe.record), not one that formats records."""
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.name, record.levelno, record.levelname, record.msg, record.args = (
            self.name, logging.INFO, "INFO", message, None)
        self._queueing.enqueue(record)

    def count_drop(self) -> None:
        with self._lock:
            self.dropped += 1
            listener = self._on_drop
        if listener is not None:
            listener(self.name, 1)

    def stop(self) -> None:
        """Write out every record queued so far, then end the thread and close the destination."""
        if not self._running:
            return
        self._running = False
        self._listener.stop()
        self.destination.close()


def background_logs(logger: logging.Logger) -> list[BackgroundLog]:
    """The background logs whose handlers are on `logger`."""
    return [h.owner for h in logger.handlers if isinstance(h, _DroppingQueueHandler)]
