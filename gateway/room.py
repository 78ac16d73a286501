"""Whether this node has room to store what it accepts, for /readyz: the free space of its file
systems (the data folder's, a SQLite database's) and a write the database refused for want
of space a moment ago (PostgreSQL's disk is beyond this host's sight).

A probe comes every few seconds from each load balancer: it costs a statvfs per file system
and a stat, and writes nothing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import make_url

from gateway.blobs import free_bytes

#: seconds /readyz says not ready after a write met a full database (then it tries again:
#: a load balancer that sends traffic meets the next 507 and takes the node out again)
FULL_RECENTLY = 60.0
#: in the data folder: its modification time is when a write of this node last met a full
#: database, so that every process of the node (each gunicorn worker) sees it
MARK = "storage-full.seen"


class FullDatabase:
    """When a write of this node last met a full database ("full" outages: SQLite's
    SQLITE_FULL, PostgreSQL's 53100, ENOSPC): kept in this process and as the modification
    time of ``<data_dir>/storage-full.seen``. Noting it touches that file at most once a
    second; a disk too full to create it leaves the process's own memory, and the free-space
    check, to say so."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / MARK
        self._noted = 0.0

    def note(self) -> None:
        now = time.time()
        if now - self._noted < 1.0:
            return
        self._noted = now
        try:
            self.path.touch()  # an existing file: its inode's time only, which a full disk still takes
        except OSError:
            pass

    def seconds_ago(self) -> float | None:
        """Seconds since a write last met a full database, if within FULL_RECENTLY."""
        try:
            latest = max(self._noted, os.stat(self.path).st_mtime)
        except OSError:  # none noted by any process
            latest = self._noted
        ago = time.time() - latest
        return ago if -FULL_RECENTLY < ago < FULL_RECENTLY else None  # (a clock set back: not for long)


def folders(data_dir: Path, database_url: str) -> list[Path]:
    """The folders whose file systems hold what an accept writes: the data folder and, for
    SQLite, the database file's folder (where it is elsewhere)."""
    out = [data_dir]
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        folder = Path(url.database).resolve().parent
        if folder != data_dir.resolve():
            out.append(folder)
    return out


def shortage(folders_: list[Path], min_free: int) -> str | None:
    """What /readyz says when a file system of ``folders_`` has less than ``min_free`` bytes
    free (None: room on each, or the check is off)."""
    if not min_free:
        return None
    for folder in folders_:
        try:
            free = free_bytes(folder)
        except OSError:  # not there (yet): the database check says what is wrong with it
            continue
        if free < min_free:
            return (f"full: {free / 2**20:.1f} MiB free on the file system of {folder}, below [api] "
                    f"ready_min_free_bytes ({min_free / 2**20:.1f} MiB); accepts would fail 507 storage-full: "
                    f"free space there")
    return None
