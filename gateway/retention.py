"""Unclaimed content (the ``blobs`` job): bodies and attachments in the blob store that no
stored message names and that were not written or used for ``[api] unclaimed_upload_days``
are removed, so that uploads a caller never sent on (a document refused, a caller that gave
up) neither fill the disk nor keep (possibly classified) content on it for ever. Content a
stored message names is never removed.

One run (``gateway sync blobs``, or ``[schedules.blobs]``):

1. *Claims.* Every message stored since the last run (one day of overlap) is read, and the
   SHA-256 of each file its envelope names is recorded in ``blob_claims``. A claimed content
   is kept for good. The first run reads every stored message.
2. *Removal.* Every file of the store older than the retention (its modification time: when
   it was last written or marked in use) whose content is not claimed is set aside (into
   ``trash/``), at most ``PER_RUN`` a run. Then one transaction removes their ``blobs`` rows
   and upload grants and appends one audit entry (``blob.remove``) listing the SHA-256 of
   each, with the bytes freed; only after it are the files removed.
3. Leftovers older than two days in the store's ``tmp/`` (an upload cut off by a crash) are
   removed. (A run that crashed between taking a file aside and removing it is finished by
   the next run first: the file is put back if it was used meanwhile, removed if not.)

Why a message being stored meanwhile cannot lose its content: whoever is about to name
content in a new message marks it in use first (the documents API through
:meth:`BlobStore.in_use`, which keeps every named file younger than half the retention;
federation and ferry imports through :meth:`BlobStore.touch`), and :meth:`BlobStore.set_aside`
reads the file's time again after taking it aside, putting back what was marked in use
before that. Content marked in use after it was taken aside is found gone: an import stores
it again, the API refuses the document (422 unknown-blob: upload it again).
"""
from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime, timedelta
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from gateway import audit
from gateway.models import AdapterState, Blob, BlobClaim, BlobGrant, Message

if TYPE_CHECKING:
    from gateway.node import Node

log = logging.getLogger("gateway.retention")

#: removals a run makes at most (the audit entry lists each); the next run goes on
PER_RUN = 1000
#: messages read again by the next run, in case one stored with an earlier time committed late
OVERLAP = timedelta(days=1)
#: leftovers in tmp/ older than this are removed
LEFTOVER_SECONDS = 2 * 86_400
_CURSOR = ("blobs", "claims-scanned-to")
_PAGE = 200
#: the files an envelope names: attachment elements carry sha256="…" (gateway.envelope)
_NAMED = re.compile(rb'sha256="([0-9a-f]{64})"')


def run(node: Node) -> dict[str, Any]:
    days = node.config.api.unclaimed_upload_days
    if not days:
        return {"skipped": "[api] unclaimed_upload_days is 0: unclaimed content is kept"}
    store = node.blobs
    older_than = time.time() - days * 86_400
    # a run that crashed midway left what it had set aside: what was used since goes back,
    # the rest is removed with this run's
    restored, aside = store.recover_trash(older_than)
    scanned, claimed = scan_claims(node)
    for sha, _mtime, _size in unclaimed(node, older_than):
        if len(aside) >= PER_RUN:
            break
        size = store.set_aside(sha, older_than)
        if size is not None:
            aside[sha] = size
    if aside:
        # recorded (and the rows gone) before any file is: a crash after this commit leaves
        # the files set aside, and the next run removes them (and records them again)
        gone = sorted(sha for sha in aside if not store.exists(sha))  # not stored again meanwhile
        with node.db.begin() as s:
            for i in range(0, len(gone), 500):
                part = gone[i:i + 500]
                s.execute(delete(BlobGrant).where(BlobGrant.sha256.in_(part)))
                s.execute(delete(Blob).where(Blob.sha256.in_(part)))
            audit.append(s, actor="job:blobs", action="blob.remove", obj="blobs",
                         detail={"count": len(aside), "bytes": sum(aside.values()),
                                 "unclaimed_upload_days": days, "sha256": sorted(aside)})
        for sha in aside:
            store.discard(sha)
    leftovers, leftover_bytes = store.sweep_tmp(time.time() - LEFTOVER_SECONDS)
    if aside or leftovers:
        log.info("removed %d unclaimed contents (%d bytes) and %d leftovers (%d bytes)", len(aside),
                 sum(aside.values()), leftovers, leftover_bytes)
    return {"messages_read": scanned, "newly_claimed": claimed, "removed": len(aside),
            "bytes_freed": sum(aside.values()), "more": len(aside) >= PER_RUN,
            "leftovers_removed": leftovers, "leftover_bytes": leftover_bytes, "put_back": restored}


def unclaimed(node: Node, older_than: float) -> Iterator[tuple[str, float, int]]:
    """(SHA-256, modification time, size) of each stored file older than ``older_than`` (a
    time) whose content no message names, as far as ``blob_claims`` knows (scan_claims
    first); claims are looked up 500 files at a time."""
    page: list[tuple[str, float, int]] = []

    def settle() -> Iterator[tuple[str, float, int]]:
        with node.db.sessions() as s:
            kept = set(s.scalars(select(BlobClaim.sha256).where(BlobClaim.sha256.in_([p[0] for p in page]))))
        yield from (p for p in page if p[0] not in kept)
        page.clear()

    for entry in node.blobs.stored():
        if entry[1] < older_than:
            page.append(entry)
            if len(page) == 500:
                yield from settle()
    if page:
        yield from settle()


def preview(node: Node, days: int, sample: int = 20) -> dict[str, Any]:
    """What the job would remove with a retention of ``days``: it records claims as the job
    does (which changes nothing else) and removes nothing."""
    scanned, claimed = scan_claims(node)
    count = size = 0
    first: list[tuple[str, float, int]] = []
    for entry in unclaimed(node, time.time() - days * 86_400):
        count, size = count + 1, size + entry[2]
        if len(first) < sample:
            first.append(entry)
    return {"messages_read": scanned, "newly_claimed": claimed, "count": count, "bytes": size, "first": first}


def scan_claims(node: Node) -> tuple[int, int]:
    """Record the contents named by messages stored since the last scan; (messages read,
    contents newly claimed). Page by page in the order of the ``accepted_at`` index, each
    read in a short transaction of its own; after each page the rest of its last instant is
    read too, and the next page starts after that instant. So no page needs a sort beyond
    the index's own order (on PostgreSQL before 13, ordering by time and id sorted every
    row after the cursor, for every page), and any number of messages sharing one instant
    are each read once."""
    started = datetime.now(UTC)
    with node.db.sessions() as s:
        row = s.get(AdapterState, _CURSOR)
        since = datetime.fromisoformat(row.value) - OVERLAP if row is not None else None
    cols = (Message.accepted_at, Message.id, Message.envelope_xml)
    after: datetime | None = None
    read = new = 0
    while True:
        q = select(*cols).order_by(Message.accepted_at).limit(_PAGE)
        if after is not None:
            q = q.where(Message.accepted_at > after)
        elif since is not None:
            q = q.where(Message.accepted_at >= since)
        with node.db.sessions() as s:
            rows = list(s.execute(q).all())
            if not rows:
                break
            last = rows[-1][0]
            if len(rows) == _PAGE:  # the rest of the last instant, which the limit may have cut
                have = [r[1] for r in rows if r[0] == last]
                rows += s.execute(select(*cols).where(Message.accepted_at == last, Message.id.not_in(have))).all()
        named = {m.decode() for _, _, xml in rows for m in _NAMED.findall(xml)}
        new += _claim(node, named)
        read += len(rows)
        after = last
    with node.db.begin() as s:
        row = s.get(AdapterState, _CURSOR)
        if row is None:
            s.add(AdapterState(adapter=_CURSOR[0], key=_CURSOR[1], value=started.isoformat()))
        else:
            row.value = started.isoformat()
    return read, new


def _claim(node: Node, shas: set[str]) -> int:
    if not shas:
        return 0
    with node.db.begin() as s:
        have = set(s.scalars(select(BlobClaim.sha256).where(BlobClaim.sha256.in_(shas))))
        fresh = shas - have
        now = datetime.now(UTC)
        s.add_all(BlobClaim(sha256=sha, claimed_at=now) for sha in sorted(fresh))
    return len(fresh)
