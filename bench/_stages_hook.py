"""Thread-CPU timers around the steps of a request, put into each gunicorn worker by
bench/stages.py (through bench/_stages_conf.py); a production node never loads this.

Each timer adds ``time.thread_time()`` spent inside a function, callees included, to a
per-process total: CPU time of the thread itself, so a thread waiting for the GIL, a lock or
the disk is not charged. Every ``EVERY`` requests the worker writes its totals to
``$STAGES_DIR/<pid>.json`` (a new file renamed into place), and bench/stages.py takes the
difference between two such files, so warm-up is left out."""
from __future__ import annotations

import functools
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

EVERY = 250

_total: defaultdict[str, float] = defaultdict(float)
_calls: Counter[str] = Counter()
_clock = time.thread_time


def _add(name: str, seconds: float) -> None:
    _total[name] += seconds
    _calls[name] += 1


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = _clock()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(name, _clock() - t)

    return wrapper


def _dump(folder: str) -> None:
    path = os.path.join(folder, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"seconds": _total, "calls": _calls}, f)
    os.replace(path + ".tmp", path)


def _patch(owner: Any, attr: str, name: str) -> None:
    setattr(owner, attr, timed(name, getattr(owner, attr)))


def install(worker: Any) -> None:
    """Wrap the worker's request handling and, in the gateway, the accept path's steps."""
    folder = os.environ["STAGES_DIR"]
    handle, app = worker.handle, worker.wsgi
    count = 0

    def counted_handle(conn: Any) -> Any:
        nonlocal count
        t = _clock()
        try:
            return handle(conn)
        finally:
            _add("handle", _clock() - t)
            count += 1  # one thread at a time holds the GIL: a lost increment only delays a dump
            if count % EVERY == 0:
                _dump(folder)

    worker.handle = counted_handle
    worker.wsgi = timed("wsgi", app)
    _patch(worker.log, "access", "access log")
    views = app.view_functions
    if "documents.send_document" not in views:  # the bare app
        views["documents"] = timed("view", views["documents"])
        return
    views["documents.send_document"] = timed("view", views["documents.send_document"])

    from gateway import db, pipeline
    from gateway.api import auth
    from systems.documents import api, payload

    _patch(auth, "require", "auth")
    _patch(api, "_document_in", "body + model")
    _patch(api, "granted", "blob grants")
    _patch(payload, "to_envelope", "envelope")
    _patch(api, "accept", "accept")
    _patch(pipeline, "plan_routes", "routes")
    _patch(pipeline, "_plan", "rows + XML")
    _patch(db.Database, "write", "group commit")
    _patch(db.Database, "_commit_group", "commit a group")
    _patch(pipeline, "_store", "statements")
    _patch(db.Database, "_sync_wal", "WAL fsync")
    _patch(api, "_accepted_out", "202 answer")
    _patch(api, "_json", "202 answer JSON")
