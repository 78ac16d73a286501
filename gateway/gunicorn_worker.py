"""The gunicorn worker the gateway runs in: gthread, with two changes.

**New connections go to the worker with the fewest.** The workers of one gunicorn share its
listening socket and race to accept each connection; a kept-alive connection then stays with
the worker that won it. A worker runs Python on one core at a time (the GIL), so when one worker
wins six of a caller's eight connections, it has three quarters of that caller's work to do on
one core while the other has little: measured on the 2-core benchmark machine (the load of
bench/accept_rate.py, 2 workers), 465 accepts/s with all eight connections on one worker,
592-695/s with six on one, 740/s with four each. Here every worker publishes its number of
open connections in a table in shared memory that gunicorn's master makes, and in which it
gives each worker its slot, before it forks the worker. A worker about to accept while another
live, accepting worker has fewer connections waits until that one, woken by the same
connection, has taken it; if it has not within ``WAIT`` (it is busy), this one takes it. No
connection is refused or held longer than that. A worker that is starting, stopping (after
``max_requests``, on HUP or TERM) or not accepting publishes no count, so nobody waits for it.
With ``reuse_port`` every worker has its own queue of new connections and nothing is balanced.

**A client that stops sending in the middle of a request is cut off.** gunicorn hands a
connection to a thread once its first bytes arrive; the thread then reads the request line,
the headers and (through the application) the body with blocking reads that have no time
limit, so a client that stalls half-way holds the thread for as long as it likes, and a few
such clients (eight per worker by default) stop the node answering anyone. Each connection
gets a receive and a send timeout (``SO_RCVTIMEO``, ``SO_SNDTIMEO``; ``GATEWAY_READ_TIMEOUT``
seconds, 60 by default, like nginx's ``client_body_timeout``): a read or write that waits
that long for a single byte fails, the thread lets go and the connection is closed. The
limit is on silence, not on the whole request: a 1 GB upload that keeps moving is never
cut. gunicorn logs a stall in the headers as a socket error with a traceback; here it is one
line (``_Stalled``). In the body, the application answers 400 ``incomplete-body``.

**gunicorn's own error answers are problem+json.** A request gunicorn cannot parse (a broken
request line, a request line or headers too long, a bad chunk) never reaches the application;
gunicorn answered it with an HTML page. Here it gets the RFC 9457 body the API gives every
other error, with a ``type`` a caller can switch on.

    worker_class = "gateway.gunicorn_worker.GatewayThreadWorker"   (config/gunicorn.conf.py)
"""
from __future__ import annotations

import http
import json
import logging
import mmap
import os
import select
import socket
import struct
import time
from typing import Any

from gunicorn import glogging, util
from gunicorn.http.errors import NoMoreData, ParseException
from gunicorn.workers.gthread import ThreadWorker

from gateway.api.problems import client_stalled, problem_document, shown

#: workers of one master the table can hold at once (more run unbalanced, with a warning)
SLOTS = 64
#: how long a worker with more connections than another lets that one take a new connection
#: (it looks every STEP whether the connection is still there); its own events wait meanwhile
WAIT = 0.010
STEP = 0.0005
#: the count a slot shows while its worker does not accept: never fewer than anyone's
NOT_ACCEPTING = 2**62
#: a slot given to a worker that has not started yet; free again if it never does
_RESERVED, _RESERVATION_SECONDS = -1, 120


def _started(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot), 0 if there is no such process;
    a pid the system has given to a new process since shows another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


class Table:
    """Per slot three 64-bit integers: a worker's pid (0: free; -1: reserved), its open
    connections, and its start time (for a reservation, when it was made). Only the master
    gives out slots (it is single-threaded), each worker writes only its own slot, and aligned
    8-byte stores and loads are atomic on the machines gunicorn runs on; a reader may see a
    count a moment old, which costs at most one ``WAIT``."""

    WIDTH = 3

    def __init__(self, slots: int = SLOTS) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, 8 * self.WIDTH * slots)  # anonymous and shared across fork
        self.cells: Any = memoryview(self._mem).cast("q")

    def _live(self, i: int) -> bool:
        c, w = self.cells, self.WIDTH
        pid = c[w * i]
        if pid == _RESERVED:
            return time.monotonic() - c[w * i + 2] / 1000 < _RESERVATION_SECONDS
        if pid <= 0:
            return False
        started = c[w * i + 2]
        if started == 0:  # no /proc to tell a reused pid from the worker's own
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):
                return False
            return True
        return _started(pid) == started

    def reserve(self) -> int | None:
        """(Master, before a fork) a free slot for the next worker, or None when all are taken.
        A slot whose worker is gone (even one killed without letting go) is free."""
        c, w = self.cells, self.WIDTH
        for i in range(self.slots):
            if c[w * i] == 0 or not self._live(i):
                c[w * i + 1] = NOT_ACCEPTING
                c[w * i + 2] = int(time.monotonic() * 1000)
                c[w * i] = _RESERVED
                return i
        return None

    def occupy(self, slot: int, pid: int) -> None:
        """(Worker, after the fork) the slot is this process's from now on."""
        c, w = self.cells, self.WIDTH
        c[w * slot + 1] = NOT_ACCEPTING
        c[w * slot + 2] = _started(pid)
        c[w * slot] = pid

    def release(self, slot: int, pid: int) -> None:
        if self.cells[self.WIDTH * slot] == pid:
            self.cells[self.WIDTH * slot] = 0

    def set_count(self, slot: int, count: int) -> None:
        self.cells[self.WIDTH * slot + 1] = count

    def fewer_elsewhere(self, slot: int, count: int) -> bool:
        """Whether another live worker that accepts has fewer than ``count`` connections."""
        c, w = self.cells, self.WIDTH
        return any(i != slot and c[w * i] > 0 and c[w * i + 1] < count and self._live(i)
                   for i in range(self.slots))


#: the default of GATEWAY_READ_TIMEOUT: seconds a client may send (or take) nothing in the
#: middle of a request
READ_TIMEOUT = 60.0


def read_timeout() -> float:
    """``GATEWAY_READ_TIMEOUT`` (seconds), or the default; a value that is not a positive
    number stops the worker with a message that names it."""
    raw = os.environ.get("GATEWAY_READ_TIMEOUT", "").strip()
    if not raw:
        return READ_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86_400:
        raise SystemExit(f"GATEWAY_READ_TIMEOUT={raw!r}: expected the seconds a client may send nothing in the "
                         f"middle of a request, a number above 0 (at most 86400), e.g. 60")
    return value


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _Stalled(logging.Filter):
    """gunicorn's log record for a client that stalled in its request line or headers (the
    read timed out): one line instead of "Socket error processing request." and a traceback."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and client_stalled(exc):
            record.msg = (f"a client sent or took nothing for {self.seconds:g} s in the middle of a request "
                          f"(GATEWAY_READ_TIMEOUT); its connection was closed")
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


#: gunicorn's statuses for requests it could not parse, as problem types
_KINDS = {400: "malformed-request", 403: "forbidden-request", 414: "uri-too-long", 417: "malformed-request",
          431: "header-too-large", 501: "unsupported-coding"}


def problem_bytes(status: int, message: str) -> bytes:
    """The whole HTTP answer for an error gunicorn found before the application ran."""
    kind = _KINDS.get(status, "internal" if status >= 500 else "malformed-request")
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    detail = message or ("an internal error occurred; it has been logged" if status >= 500 else reason)
    body = json.dumps(problem_document(status, kind, detail), ensure_ascii=False).encode("utf-8")
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


def _write_problem(sock: Any, status_int: int, reason: str, mesg: str) -> None:  # noqa: ARG001
    # (gunicorn's reason phrase is not used: it says "Bad Request" for its 500 and 501 too)
    util.write_nonblock(sock, problem_bytes(status_int, mesg))


#: what a kept-alive connection may still read of a body the application did not read whole
_DRAIN = 1 << 20


class GatewayThreadWorker(ThreadWorker):  # type: ignore[misc] # (gunicorn has no type hints)
    """``gthread``, balanced and answering problem+json (see the module docstring)."""

    #: made in the master by the first worker object, before any fork; one for all its workers
    table: Table | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # runs in the master, just before the fork that starts this worker
        self._conns = 0
        self._slot: int | None = None
        super().__init__(*args, **kwargs)
        if self.cfg.reuse_port:  # each worker has its own queue: the others cannot take a connection
            return
        if GatewayThreadWorker.table is None:
            GatewayThreadWorker.table = Table()
        self._slot = GatewayThreadWorker.table.reserve()

    # ThreadWorker counts its open connections in nr_conns, and says whether it accepts with
    # set_accept_enabled (False while starting, when full, and once stopping): both published
    @property
    def nr_conns(self) -> int:
        return self._conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        self._conns = value
        self._publish()

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        self._publish()

    def _publish(self) -> None:
        if self._slot is not None and self.table is not None:
            accepting = getattr(self, "_accepting", False) and self.alive
            self.table.set_count(self._slot, self._conns if accepting else NOT_ACCEPTING)

    def init_process(self) -> None:
        # this process is a worker from here on: gunicorn's error page is written only by
        # Worker.handle_error, through this module-level function
        util.write_error = _write_problem
        seconds = read_timeout()
        self._timeouts = _timeval(seconds)
        self.log.error_log.addFilter(_Stalled(seconds))
        table, pid = self.table, os.getpid()
        if self._slot is None:
            if table is not None and not self.cfg.reuse_port:
                self.log.warning("worker %s: no free slot in the connection table; it accepts unbalanced", pid)
        elif table is not None:
            table.occupy(self._slot, pid)
        try:
            super().init_process()  # runs the worker until it stops
        finally:
            if table is not None and self._slot is not None:
                table.release(self._slot, pid)

    def handle_exit(self, sig: Any, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._publish()  # stopping: new connections are for the others from now on

    def handle_request(self, req: Any, conn: Any) -> bool:
        keep = super().handle_request(req, conn)
        if keep and req.body is not None:
            # The next request starts after this one's body. gunicorn reads what the
            # application left of it only when it parses that next request, and answers a
            # body it cannot frame (a bad chunk size) with a second answer to this one. Read
            # the rest here instead: up to 1 MiB, and a body that is longer or malformed ends
            # the connection, quietly (this request has had its answer).
            try:
                left = _DRAIN
                while left > 0:
                    got = req.body.read(min(left, 65536))
                    if not got:
                        return True
                    left -= len(got)
                return False
            except (ParseException, NoMoreData, OSError):
                return False
        return keep

    def enqueue_req(self, conn: Any) -> None:
        # every connection, before a thread first reads from it (see the module docstring);
        # the socket options stay through keep-alive, and they apply only while it blocks
        if not getattr(conn, "gateway_timeouts", False):
            conn.gateway_timeouts = True
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._timeouts)
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._timeouts)
            except OSError:  # gone already: the thread finds that out itself
                pass
        super().enqueue_req(conn)

    def accept(self, listener: Any) -> None:
        table, slot = self.table, self._slot
        if table is not None and slot is not None and table.fewer_elsewhere(slot, self._conns):
            # the other worker was woken by this connection too: give it up to WAIT to take it
            deadline = time.monotonic() + WAIT
            while True:
                time.sleep(STEP)
                if not select.select([listener], [], [], 0)[0]:
                    return  # taken (or given up by the client)
                if time.monotonic() >= deadline or not table.fewer_elsewhere(slot, self._conns):
                    break
        super().accept(listener)  # a connection taken meanwhile is EAGAIN, which ThreadWorker ignores


class GatewayLogger(glogging.Logger):
    """gunicorn's logger, with the access log's path, referrer and user agent made safe to
    read: the path is written as the UTF-8 it was sent in (gunicorn hands it over decoded
    byte by byte, so 公文 came out as mojibake), and control characters in any of them as
    escapes, so that a ``%0A`` in a URL cannot forge a log line nor ``%1B`` drive a
    terminal."""

    def atoms(self, resp, req, environ, request_time):  # type: ignore[no-untyped-def]
        atoms = super().atoms(resp, req, environ, request_time)
        path = atoms.get("U")
        if path and not (path.isascii() and path.isprintable()):
            atoms["U"] = shown(path.encode("latin-1", "replace").decode("utf-8", "replace"))
        for k in ("u", "f", "a", "m", "H"):  # u: the user of an Authorization: Basic header, decoded
            v = atoms.get(k)
            if isinstance(v, str) and not v.isprintable():
                atoms[k] = shown(v)
        return atoms
