"""Append-only, hash-chained audit log (审计日志, GB/T 22239-2019 8.1.4.3).

Each entry records who, what, when and the outcome, and its ``hash`` is
``SHA-256(prev_hash | seq | at | actor | action | object | outcome | detail)``. An entry is
appended inside the caller's transaction, so the audit record and the change it describes
commit together or not at all. Appends are serialised (PostgreSQL: a transaction-scoped
advisory lock; SQLite: the single writer), so the chain never forks.

:func:`verify` recomputes the chain and reports the first altered, removed or reordered
entry. Truncating the newest entries is only visible against an exported head (``gateway
audit verify --expect-head SEQ:HASH``), which operators record off-node.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any
from collections.abc import Iterator

from sqlalchemy import Connection, insert, or_, select, text
from sqlalchemy.orm import Session

from gateway.db import claim_audit_lock, driver_mark, driver_stamp
from gateway.models import table, AuditEntry

GENESIS = "0" * 64
_LOCK_ID = 0x6761_7564  # "gaud"
#: PostgreSQL: serialises appends to the chain until the transaction ends
_PG_LOCK = f"SELECT pg_advisory_xact_lock({_LOCK_ID})"


def _digest(prev: str, seq: int, at: datetime, actor: str, action: str, obj: str, outcome: str, detail: str) -> str:
    h = hashlib.sha256(f"{prev}\x1f{seq}\x1f".encode())
    h.update(_digest_tail(at, actor, action, obj, outcome, detail))
    return h.hexdigest()


def _digest_tail(at: datetime, actor: str, action: str, obj: str, outcome: str, detail: str) -> bytes:
    """What an entry's hash covers after ``prev_hash`` and ``seq``: each part in UTF-8,
    each followed by a 0x1F (unit separator)."""
    parts = (at_text(at), actor, action, obj, outcome, detail)
    return "".join(f"{p}\x1f" for p in parts).encode("utf-8")


def at_text(at: datetime) -> str:
    """An entry's time as its hash covers it (and as ``gateway audit export`` writes it)."""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="microseconds")


def canonical(detail: dict[str, Any] | None) -> str:
    return json.dumps(detail or {}, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


_HEAD = select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
_INSERT = insert(table(AuditEntry))


def append(session: Session | Connection, *, actor: str, action: str, obj: str, outcome: str = "ok",
           detail: dict[str, Any] | None = None) -> None:
    """Append one entry in ``session``'s transaction."""
    append_many(session, [Record(actor, action, obj, outcome, detail)])


@dataclass
class Record:
    actor: str
    action: str
    obj: str
    outcome: str = "ok"
    detail: dict[str, Any] | None = None


def _chain(seq: int, prev: str, at: datetime, records: list[Record]) -> list[dict[str, Any]]:
    """The rows that continue a chain whose head is (``seq``, ``prev``)."""
    rows = []
    for r in records:
        seq += 1
        d = canonical(r.detail)
        h = _digest(prev, seq, at, r.actor, r.action, r.obj, r.outcome, d)
        rows.append(dict(seq=seq, at=at, actor=r.actor, action=r.action, object=r.obj, outcome=r.outcome,
                         detail=d, prev_hash=prev, hash=h))
        prev = h
    return rows


def append_many(session: Session | Connection, records: list[Record]) -> None:
    """Append entries in order, in the transaction of ``session`` (an ORM Session or a Core
    Connection), with one read of the chain's head and one multi-row insert."""
    if not records:
        return
    dialect = session.dialect if isinstance(session, Connection) else session.get_bind().dialect
    if dialect.name == "postgresql":
        session.execute(text(_PG_LOCK))
    if isinstance(session, Session):
        session.flush()  # entries appended earlier in this transaction are part of the head
    last = session.execute(_HEAD).first()
    seq, prev = (last[0], last[1]) if last else (0, GENESIS)
    session.execute(_INSERT, _chain(seq, prev, datetime.now(UTC), records))


_COLUMNS = ("seq", "at", "actor", "action", "object", "outcome", "detail", "prev_hash", "hash")
_DRIVER_SQL = {
    postgres: ("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
               f"INSERT INTO audit_log ({', '.join(_COLUMNS)}) VALUES ({', '.join([mark] * len(_COLUMNS))})")
    for postgres, mark in ((True, driver_mark(True)), (False, driver_mark(False)))
}


#: PostgreSQL: one entry chained by the server, in the statement that inserts it: the
#: hash is SHA-256 of ``prev_hash \x1f seq \x1f`` (known only to the server) followed by
#: the client's :func:`_digest_tail`, the same bytes :func:`_digest` hashes. No round trip
#: to read the head first, so the accept path sends its statements in one pipeline.
PG_APPEND_ONE = (
    f"INSERT INTO audit_log ({', '.join(_COLUMNS)}) "
    "SELECT h.seq + 1, %s, %s, %s, %s, %s, %s, h.hash, encode(sha256("
    "convert_to(h.hash || chr(31) || (h.seq + 1)::text || chr(31), 'UTF8') || %s::bytea), 'hex') "
    "FROM (SELECT m.seq, COALESCE(a.hash, %s) AS hash FROM (SELECT COALESCE(max(seq), 0) AS seq FROM audit_log) m "
    "LEFT JOIN audit_log a ON a.seq = m.seq) h")


def lock_driver(cursor: Any, conn: Connection | None = None) -> None:
    """PostgreSQL: take the chain's lock for the transaction, on a DBAPI cursor, before an
    entry is appended; not again in a group commit's transaction that holds it (``conn``)."""
    if conn is None or claim_audit_lock(conn):
        cursor.execute(_PG_LOCK)


def pg_append_one_params(r: Record) -> tuple[Any, ...]:
    """The parameters of :data:`PG_APPEND_ONE` for entry ``r``, stamped now."""
    at = datetime.now(UTC)
    d = canonical(r.detail)
    return (at, r.actor, r.action, r.obj, r.outcome, d, _digest_tail(at, r.actor, r.action, r.obj, r.outcome, d),
            GENESIS)


def append_driver(cursor: Any, postgres: bool, records: list[Record], conn: Connection | None = None) -> None:
    """:func:`append_many` on a DBAPI cursor (sqlite3 or psycopg) inside the caller's
    transaction: for the accept path, which runs while every other writer waits. On
    PostgreSQL a single entry is chained by the server (:data:`PG_APPEND_ONE`): nothing is
    read back, so a psycopg pipeline can carry it with the statements before it. ``conn``:
    the connection of a group commit (:meth:`gateway.db.Database.write`), whose transaction
    takes the chain's lock once for all its units."""
    head, insert_sql = _DRIVER_SQL[postgres]
    if postgres:
        lock_driver(cursor, conn)
    if postgres and len(records) == 1:
        cursor.execute(PG_APPEND_ONE, pg_append_one_params(records[0]))
        return
    cursor.execute(head)
    last = cursor.fetchone()
    at = datetime.now(UTC)
    rows = _chain(last[0], last[1], at, records) if last else _chain(0, GENESIS, at, records)
    stamp = driver_stamp(at, postgres)
    cursor.executemany(insert_sql, [(r["seq"], stamp, *(r[c] for c in _COLUMNS[2:])) for r in rows])


@dataclass
class VerifyResult:
    ok: bool
    entries: int
    head: str
    problem: str | None = None
    seq: int | None = None


def _iter(session: Session, batch: int = 5000) -> Iterator[AuditEntry]:
    after = 0
    while True:
        rows = session.scalars(
            select(AuditEntry).where(AuditEntry.seq > after).order_by(AuditEntry.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        after = rows[-1].seq


def verify(session: Session, expect_head: str | None = None) -> VerifyResult:
    prev, expected_seq, n = GENESIS, 1, 0
    for e in _iter(session):
        n += 1
        if e.seq != expected_seq:
            return VerifyResult(False, n, prev, f"entry {expected_seq} is missing (next is {e.seq})", expected_seq)
        if e.prev_hash != prev:
            return VerifyResult(False, n, prev, f"entry {e.seq} does not follow entry {e.seq - 1} "
                                f"(removed or reordered)", e.seq)
        at = e.at if e.at.tzinfo else e.at.replace(tzinfo=UTC)
        if _digest(e.prev_hash, e.seq, at, e.actor, e.action, e.object, e.outcome, e.detail) != e.hash:
            return VerifyResult(False, n, prev, f"entry {e.seq} was altered (its hash does not match "
                                f"its content)", e.seq)
        prev, expected_seq = e.hash, e.seq + 1
    head = f"{expected_seq - 1}:{prev}"
    if expect_head:
        seq_s, _, want = expect_head.partition(":")
        if seq_s.isdigit() and int(seq_s) == 0:  # recorded while the log was empty: every chain starts there
            if want != GENESIS:
                return VerifyResult(False, n, head, f"the recorded head {expect_head} is not the empty log's "
                                    f"(0:{GENESIS})")
            return VerifyResult(True, n, head)
        seq = int(seq_s) if seq_s.isdigit() else 0
        row = session.get(AuditEntry, seq) if 0 < seq < 2**63 else None
        if row is None:
            return VerifyResult(False, n, head, f"the recorded head {expect_head} is not in the log: "
                                f"the chain ends at entry {expected_seq - 1}, so newer entries were removed")
        if row.hash != want:
            return VerifyResult(False, n, head, f"entry {seq_s} differs from the recorded head")
    return VerifyResult(True, n, head)


# -- reading the log: export and checking an export -------------------------------------------
#: the fields of one exported entry, in the order ``gateway audit export`` writes them
EXPORT_FIELDS = ("seq", "at", "actor", "action", "object", "outcome", "detail", "prev_hash", "hash")


@dataclass
class Filters:
    """Which entries :func:`export` gives; every filter given must match. ``actor``, ``action``
    and ``outcome`` match exactly, or as a prefix when they end in ``*``; ``message`` matches
    the entries about that message (object ``message:ID``) and its copies (``delivery:ID/…``);
    ``since`` is inclusive, ``until`` exclusive."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    message: str | None = None
    from_seq: int | None = None
    to_seq: int | None = None


def _like(column: Any, value: str) -> Any:
    if not value.endswith("*"):
        return column == value
    prefix = value[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(prefix + "%", escape="\\")


def _where(f: Filters) -> list[Any]:
    w: list[Any] = []
    if f.since is not None:
        w.append(AuditEntry.at >= f.since)
    if f.until is not None:
        w.append(AuditEntry.at < f.until)
    for column, value in ((AuditEntry.actor, f.actor), (AuditEntry.action, f.action),
                          (AuditEntry.outcome, f.outcome)):
        if value is not None:
            w.append(_like(column, value))
    if f.message is not None:
        m = f.message.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        w.append(or_(AuditEntry.object == f"message:{f.message}",
                     AuditEntry.object.like(f"delivery:{m}/%", escape="\\")))
    if f.to_seq is not None:
        w.append(AuditEntry.seq <= f.to_seq)
    return w


def export(session: Session, f: Filters, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """The entries ``f`` selects, oldest first, as :data:`EXPORT_FIELDS` (``at`` and
    ``detail`` as the hash covers them: a reader recomputes ``hash`` from the line alone).
    Read ``batch`` at a time by sequence number, so a log of any size is never in memory."""
    cols = [getattr(AuditEntry, c) for c in EXPORT_FIELDS]
    where = _where(f)
    after = (f.from_seq - 1) if f.from_seq else 0
    while True:
        rows = session.execute(select(*cols).where(AuditEntry.seq > after, *where)
                               .order_by(AuditEntry.seq).limit(batch)).all()
        for r in rows:
            e = dict(zip(EXPORT_FIELDS, r))
            e["at"] = at_text(e["at"])
            yield e
        if len(rows) < batch:
            return
        after = rows[-1][0]


def entry_hash(e: dict[str, Any]) -> str:
    """The hash an exported entry must carry: SHA-256 of ``prev_hash``, ``seq``, ``at``,
    ``actor``, ``action``, ``object``, ``outcome`` and ``detail`` as written, in UTF-8, each
    followed by 0x1F."""
    parts = (e["prev_hash"], str(e["seq"]), e["at"], e["actor"], e["action"], e["object"], e["outcome"],
             e["detail"])
    return hashlib.sha256("".join(f"{p}\x1f" for p in parts).encode("utf-8")).hexdigest()


@dataclass
class ExportCheck:
    entries: int = 0
    runs: int = 0  # stretches of consecutive entries, each linked by prev_hash
    first: str | None = None  # SEQ:HASH of the first and last entries
    last: str | None = None
    problem: str | None = None
    line: int | None = None


def check_export(lines: Iterator[str], expect_head: str | None = None) -> ExportCheck:
    """Check an export line by line: each entry's hash matches its content, sequence numbers
    rise, and an entry that follows the previous line's (seq + 1) names its hash as
    ``prev_hash``. ``expect_head``: SEQ:HASH recorded off the node; the export must hold that
    entry with that hash. Stops at the first problem."""
    out = ExportCheck()
    prev: dict[str, Any] | None = None
    want_seq, _, want_hash = (expect_head or "").partition(":")
    head_seen = False
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            if not isinstance(e, dict) or not isinstance(e.get("seq"), int) or not all(
                    isinstance(e.get(k), str) for k in EXPORT_FIELDS if k != "seq"):
                raise ValueError(f"expected an object with {', '.join(EXPORT_FIELDS)} (seq a number, the rest text)")
        except ValueError as exc:
            out.problem, out.line = f"not an exported entry: {exc}", no
            return out
        if entry_hash(e) != e["hash"]:
            out.problem, out.line = f"entry {e['seq']} was altered (its hash does not match its content)", no
            return out
        if prev is not None and e["seq"] <= prev["seq"]:
            out.problem, out.line = f"entry {e['seq']} comes after entry {prev['seq']} (out of order)", no
            return out
        if prev is not None and e["seq"] == prev["seq"] + 1:
            if e["prev_hash"] != prev["hash"]:
                out.problem, out.line = f"entry {e['seq']} does not follow entry {prev['seq']}", no
                return out
        else:
            out.runs += 1
        if str(e["seq"]) == want_seq:
            if e["hash"] != want_hash:
                out.problem, out.line = f"entry {want_seq} differs from the recorded head", no
                return out
            head_seen = True
        out.entries += 1
        out.first = out.first or f"{e['seq']}:{e['hash']}"
        out.last = f"{e['seq']}:{e['hash']}"
        prev = e
    if expect_head and not head_seen:
        out.problem = f"the recorded head {expect_head} is not in the export"
    return out
