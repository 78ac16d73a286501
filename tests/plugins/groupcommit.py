"""Helpers for tests of group commit (gateway.db.Database.write)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.db import Database


def in_one_group(db: Database, calls: list[Callable[[], Any]],
                 on_queued: Callable[[], None] | None = None) -> list[Any]:
    """Run each of ``calls`` (each ends in one ``db.write``) in a thread of its own while a
    unit of ours holds the lead of ``db``'s group commit; once all of them wait in its queue,
    ``on_queued()`` runs and the lead is let go, so their units form one group. Returns
    what each call returned, or the exception it raised."""
    hold, holding = threading.Event(), threading.Event()

    def block(conn: Any) -> None:
        holding.set()
        assert hold.wait(20)

    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001 - the caller's outcome, as it got it
            out[i] = exc

    leader = threading.Thread(target=db.write, args=(block,))
    leader.start()
    assert holding.wait(10)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(db._jobs) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.005)
    if on_queued is not None:
        on_queued()
    hold.set()
    for t in [leader, *threads]:
        t.join(30)
    return out
