"""The gateway command line with a crash point, for crash tests: ``python -m tests.crashpoint
--config FILE worker --once`` runs ``gateway --config FILE worker --once``, and the process
kills itself with SIGKILL (no clean-up, no atexit, no flush) the ``N``-th time it reaches the
instant that ``GATEWAY_TEST_CRASH="POINT:N"`` names. Test-only: production code has no such
hook; the points are put in by wrapping functions here, before the command runs.

Points:

``record``
    the delivery worker called the adapters and is about to record the outcomes;
``ack`` / ``reject``
    an item polled from a legacy system was recorded (committed) and is about to be
    acknowledged (moved to ``archive/``) or refused (moved to ``failed/``) at its source;
``sftp-rename``
    an SFTP rename just happened (a delivery's ``.part`` into place before its ``.ok``; an
    acknowledged file moved before its ``.ok`` follows);
``sftp-upload``
    a delivery's ``.part`` is written, not yet renamed into place;
``push-claimed``
    the ``push`` job claimed a batch for a peer and has sent nothing of it yet;
``pull-fetched``
    the ``pull`` job fetched a batch from a peer and has applied nothing of it yet;
``batch-applied``
    items from a peer (a pulled batch, a ferry file) were applied and not yet recorded as
    taken (acknowledged, the file archived);
``ferry-written``
    ``ferry-out`` wrote a file and its ``.sig`` and has not yet recorded its sequence number;
``accepted``
    the API stored (committed) a document and has not answered yet;
``ingested``
    an item polled or pushed (a callback) was stored and acknowledged, the push not answered yet.

With ``GATEWAY_TEST_CRASH_MARK=FILE`` the point kills once only, whichever process reaches
it: ``gateway serve``'s gunicorn master starts a new worker after the kill (forked from the
master, with its count at zero), and that one goes on running.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

ENV = "GATEWAY_TEST_CRASH"


def _die() -> None:
    mark = os.environ.get(ENV + "_MARK")
    if mark:
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # killed once already
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    def __init__(self, point: str, at: int) -> None:
        self.point, self.at, self.n = point, at, 0
        self.lock = threading.Lock()

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        with self.lock:
            self.n += 1
            if self.n == self.at:
                _die()


def _before(counter: _Counter, point: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kw: Any) -> Any:
        counter.reached(point)
        return fn(*args, **kw)
    return wrapped


def _after(counter: _Counter, point: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kw: Any) -> Any:
        out = fn(*args, **kw)
        counter.reached(point)
        return out
    return wrapped


def install(spec: str) -> None:
    """Put in the crash point ``POINT:N`` (nothing for an empty spec)."""
    if not spec:
        return
    point, _, n = spec.partition(":")
    counter = _Counter(point, int(n or "1"))
    from adapters import sftp
    from adapters.base import PolledItem
    from gateway.federation import batch, ferry
    from gateway import inbound
    from gateway.worker import Worker
    from systems.documents import api

    Worker.record = _before(counter, "record", Worker.record)  # type: ignore[method-assign]
    PolledItem.ack = _before(counter, "ack", PolledItem.ack)  # type: ignore[method-assign]
    PolledItem.reject = _before(counter, "reject", PolledItem.reject)  # type: ignore[method-assign]
    sftp._rename_over = _after(counter, "sftp-rename", sftp._rename_over)  # type: ignore[attr-defined]
    sftp._confirm_writes = _after(counter, "sftp-upload", sftp._confirm_writes)  # type: ignore[attr-defined]
    batch.split = _before(counter, "push-claimed", batch.split)  # type: ignore[attr-defined]
    batch.apply_items = _after(counter, "batch-applied",  # type: ignore[attr-defined]
                               _before(counter, "pull-fetched", batch.apply_items))
    ferry._raise_sequence = _before(counter, "ferry-written", ferry._raise_sequence)  # type: ignore[attr-defined]
    api.accept = _after(counter, "accepted", api.accept)  # type: ignore[attr-defined]
    inbound.ingest = _after(counter, "ingested", inbound.ingest)  # type: ignore[attr-defined]


if __name__ == "__main__":
    import tests.plugins.gatewaynode  # noqa: F401 - registers the "recording" adapter type

    install(os.environ.get(ENV, ""))
    from gateway.cli import main

    sys.exit(main(prog_name="gateway"))
