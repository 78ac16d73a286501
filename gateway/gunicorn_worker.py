"""The gunicorn worker the gateway runs in: gthread, with two changes.

**New connections go to the worker with the fewest.** The workers of one gunicorn share its
listening socket and race to accept each connection; a kept-alive connection then stays with
the worker that won it. A worker runs Python on one core at a time (the GIL), so when one worker
wins six of a caller's eight connections, it has three quarters of that caller's work to do on
one core while the other has little: measured on the 2-core benchmark machine (the load of
bench/accept_rate.py, 2 workers), 465 accepts/s with all eight connections on one worker,
592-695/s with six on one, 740/s with four each. Here every worker publishes its number of
open connections in a table in shared memory that gunicorn's master makes before it forks the
first worker. A worker about to accept while another live worker has fewer connections waits
until the other one, woken by the same connection, has taken it; if it has not within ``WAIT``
(it is busy), this one takes it. No connection is refused or held longer than that.

**gunicorn's own error answers are problem+json.** A request gunicorn cannot parse (a broken
request line, a request line or headers too long, a bad chunk) never reaches the application;
gunicorn answered it with an HTML page. Here it gets the RFC 9457 body the API gives every
other error, with a ``type`` a caller can switch on.

    worker_class = "gateway.gunicorn_worker.GatewayThreadWorker"   (config/gunicorn.conf.py)
"""
from __future__ import annotations

import json
import mmap
import multiprocessing
import os
import select
import time
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from gateway.api.problems import TITLES, TYPE_PREFIX

#: workers of one master the table can hold at once (more run unbalanced, with a warning)
SLOTS = 64
#: how long a worker with more connections than another lets that one take a new connection
#: (it looks every STEP whether the connection is still there); its own events wait meanwhile
WAIT = 0.010
STEP = 0.0005


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid is someone else's now
        return False
    return True


class Table:
    """Per slot two 64-bit integers: a worker's pid (0: free) and its open connections.
    Aligned 8-byte stores and loads are atomic on the machines gunicorn runs on; a reader may
    see a count a moment old, which costs at most one ``WAIT``."""

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, 16 * slots)  # anonymous and shared: forked workers see one table
        self.cells: Any = memoryview(self._mem).cast("q")
        self._claims = multiprocessing.Lock()

    def claim(self, pid: int) -> int | None:
        """A slot for ``pid`` (a slot whose worker has gone is free again), or None."""
        if not self._claims.acquire(timeout=1.0):  # a worker killed while claiming held it
            return None
        try:
            cells = self.cells
            for i in range(self.slots):
                old = cells[2 * i]
                if old == 0 or old == pid or not _alive(old):
                    cells[2 * i + 1] = 0
                    cells[2 * i] = pid
                    return i
            return None
        finally:
            self._claims.release()

    def release(self, slot: int, pid: int) -> None:
        if self.cells[2 * slot] == pid:
            self.cells[2 * slot] = 0

    def set_count(self, slot: int, count: int) -> None:
        self.cells[2 * slot + 1] = count

    def fewer_elsewhere(self, slot: int, count: int) -> bool:
        """Whether another live worker has fewer than ``count`` open connections."""
        cells = self.cells
        for i in range(self.slots):
            if i != slot and cells[2 * i] and cells[2 * i + 1] < count and _alive(cells[2 * i]):
                return True
        return False


#: gunicorn's statuses for requests it could not parse, as problem types
_KINDS = {400: "malformed-request", 403: "forbidden-request", 414: "too-large", 417: "malformed-request",
          431: "too-large", 501: "malformed-request"}


def problem_bytes(status: int, reason: str, message: str) -> bytes:
    """The whole HTTP answer for an error gunicorn found before the application ran."""
    kind = _KINDS.get(status, "internal" if status >= 500 else "malformed-request")
    detail = message or ("an internal error occurred; it has been logged" if status >= 500 else reason)
    body = json.dumps({"type": TYPE_PREFIX + kind, "title": TITLES[kind], "status": status, "detail": detail},
                      ensure_ascii=False).encode("utf-8")
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def _write_problem(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    util.write_nonblock(sock, problem_bytes(status_int, reason, mesg))


class GatewayThreadWorker(ThreadWorker):  # type: ignore[misc] # (gunicorn has no type hints)
    """``gthread``, balanced and answering problem+json (see the module docstring)."""

    #: made in the master by the first worker object, before any fork; one for all its workers
    table: Table | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if GatewayThreadWorker.table is None:
            GatewayThreadWorker.table = Table()
        self._slot: int | None = None
        self._conns = 0
        super().__init__(*args, **kwargs)

    # ThreadWorker counts its open connections in nr_conns: each change is published
    @property
    def nr_conns(self) -> int:
        return self._conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        self._conns = value
        if self._slot is not None and self.table is not None:
            self.table.set_count(self._slot, value)

    def init_process(self) -> None:
        # this process is a worker from here on: gunicorn's error page is written only by
        # Worker.handle_error, through this module-level function
        util.write_error = _write_problem
        table, pid = self.table, os.getpid()
        if table is not None:
            self._slot = table.claim(pid)
            if self._slot is None:
                self.log.warning("worker %s: no free slot in the connection table; it accepts unbalanced", pid)
            else:
                table.set_count(self._slot, self._conns)
        try:
            super().init_process()  # runs the worker until it stops
        finally:
            if table is not None and self._slot is not None:
                table.release(self._slot, pid)

    def accept(self, listener: Any) -> None:
        table = self.table
        if table is not None and self._slot is not None and table.fewer_elsewhere(self._slot, self._conns):
            # the other worker was woken by this connection too: give it up to WAIT to take it
            deadline = time.monotonic() + WAIT
            while True:
                time.sleep(STEP)
                if not select.select([listener], [], [], 0)[0]:
                    return  # taken (or given up by the client)
                if time.monotonic() >= deadline or not table.fewer_elsewhere(self._slot, self._conns):
                    break
        super().accept(listener)  # a connection taken meanwhile is EAGAIN, which ThreadWorker ignores
