"""A year of operation: does the node stay fast and bounded with production volumes?

Seeds a node's database with a prefecture node's year (default: 200,000 documents, 600,000
copies, ~1,000,000 audit entries, receipts, ingested items, outbox rows of the last 35 days
and every dead one, Idempotency-Keys of the last 30 days, blob claims), shaped like the rows
an accept, a delivery and a receipt write (one real accept gives the templates; the audit
chain is a valid one), on SQLite and on a private PostgreSQL cluster. Then it runs each read
path and job the way the node runs it (the API through Flask's test client, the worker's
claim and record, the jobs' functions, ``gateway audit verify`` and ``gateway db upgrade``
as processes) and prints, for each: the time (median of a few runs), and the statements it
sent with their plans (PostgreSQL: EXPLAIN (ANALYZE, BUFFERS), SQLite: EXPLAIN QUERY PLAN).
A full scan of a big table is marked ``FULL SCAN``. Not pass/fail: figures for a reader.

    .venv/bin/python bench/volume.py [--quick] [--scale F] [--no-sqlite] [--no-postgres] [--plans]

``--quick``: 1/20 of the volume (10,000 documents), a few minutes in all.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from collections.abc import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

BIG = ("messages", "deliveries", "audit_log", "outbox", "receipts", "ingested", "idempotency", "blob_claims",
       "blobs", "blob_grants", "job_runs")
NOOP_JOB = "volume-noop"
STATUSES = ("signed",) * 85 + ("returned",) * 5 + ("delivered",) * 5 + ("failed",) * 3 + ("recalled",) * 2


# -- seeding -----------------------------------------------------------------------------
class Seeder:
    """Bulk rows: COPY on PostgreSQL, executemany on SQLite, in chunks."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.pg = node.db.postgres

    def put(self, table: str, cols: tuple[str, ...], rows: list[tuple]) -> None:
        if not rows:
            return
        raw = self.node.db.engine.raw_connection()
        try:
            cur = raw.cursor()
            if self.pg:
                with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:  # type: ignore[attr-defined]
                    for r in rows:
                        cp.write_row(r)
            else:  # the node's connections are in autocommit mode (it issues BEGIN itself)
                cur.execute("BEGIN")
                marks = ", ".join("?" * len(cols))
                cur.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})",
                                [tuple(v.isoformat(sep=" ") if isinstance(v, datetime) else v for v in r)
                                 for r in rows])
            raw.commit()
        finally:
            raw.close()


def _sqlite_time(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None)


def seed(node: Any, n: int, keys: list[str], template: dict[str, Any], now: datetime) -> dict[str, int]:
    """``n`` documents over the last 365 days, 3 copies each, and what a year of them leaves."""
    from adapters.base import remote_ref
    from gateway import audit

    sd = Seeder(node)
    pg = sd.pg
    units = c.make_units(30, start=100)
    year = timedelta(days=365)
    stamp: Callable[[datetime], Any] = (lambda t: t) if pg else _sqlite_time
    counts = dict.fromkeys(("messages", "deliveries", "receipts", "outbox", "ingested", "idempotency",
                            "blob_claims", "audit_log"), 0)
    chunk = 20_000
    seq, prev = 0, audit.GENESIS
    with node.db.sessions() as s:
        head = s.execute(audit._HEAD).first()
        if head:
            seq, prev = head
    did = 10_000_000  # ids well above the template's
    oid = 10_000_000
    for start in range(0, n, chunk):
        msgs, dels, recs, obx, ing, idem, claims, entries = [], [], [], [], [], [], [], []
        for i in range(start, min(n, start + chunk)):
            at = now - year + year * (i / n)
            mid = str(uuid.UUID(int=(int(at.timestamp() * 1000) << 80) | (7 << 76) | (i << 8)))
            kid = keys[i % len(keys)]
            msgs.append((mid, "documents", "document", c.PREFECTURE, "非密" if i % 50 else "秘密",
                         0 if i % 50 else 2, "平件" if i % 20 else "特急", None, None, kid, "api",
                         json.dumps(template["summary"], ensure_ascii=False), template["xml"], stamp(at)))
            entries.append(("key:" + kid, "message.accept", f"message:{mid}", "ok", template["detail"], at))
            claims.append((f"{i:064x}", stamp(at)))
            age = now - at
            for k in range(3):
                did += 1
                unit = units[(i + k * 7) % len(units)]
                status = STATUSES[(i * 3 + k) % len(STATUSES)] if age > timedelta(days=3) else "queued"
                delivered = at + timedelta(minutes=1) if status != "queued" else None
                signed = at + timedelta(hours=5 + (i % 40)) if status == "signed" else None
                to_node = k == 2 and i % 10 == 0  # a copy for a unit behind node county-a
                dels.append((did, mid, unit, "县人民政府办公室", "主送", None, "node" if to_node else "adapter",
                             "county-a" if to_node else "docexchange", status,
                             remote_ref(mid, unit), f"R{did}" if delivered else None,
                             "张三" if signed else None, f"NO{did}" if signed else None,
                             "退回：请补充附件" if status == "returned" else None,
                             "permanent: refused" if status == "failed" else None,
                             stamp(delivered) if delivered else None, stamp(signed) if signed else None,
                             stamp(signed or delivered or at)))
                if delivered:
                    entries.append(("worker:w1", "delivery.attempt", f"delivery:{mid}/{unit}", "delivered",
                                    audit.canonical({"adapter": "docexchange", "attempt": 1}), delivered))
                if status in ("signed", "returned"):
                    t = signed or delivered + timedelta(hours=2)
                    recs.append((did, "signed" if signed else "returned", "张三" if signed else None,
                                 f"NO{did}" if signed else None, None, stamp(t), "docexchange", stamp(t)))
                    ing.append((f"docexchange:receipt:{did}", "docexchange", f"receipt:{did}", stamp(t)))
                    entries.append(("adapter:docexchange", "receipt." + ("sign" if signed else "return"),
                                    f"delivery:{mid}/{unit}", "ok", audit.canonical({"receipt_no": f"NO{did}"}), t))
                # the worker's rows: done for 35 days (prune keeps 30), dead for good, pending today
                if status == "failed" or age < timedelta(days=35) or status == "queued":
                    oid += 1
                    state = "dead" if status == "failed" else "pending" if status == "queued" else "done"
                    obx.append((oid, "forward" if to_node else "deliver", did, "county-a" if to_node else "docexchange",
                                None, json.dumps({"units": [unit], "hops": ["prefecture"]}) if to_node else None,
                                2, state, 1 if state != "pending" else 0,
                                stamp(at), None, None, "permanent: refused" if state == "dead" else None,
                                stamp(at), stamp(delivered or at) if state != "pending" else None))
            if age < timedelta(days=30) and i % 2 == 0:
                idem.append((kid, f"idem-{i}", "0" * 64, mid, stamp(at)))
        # the chain, in time order as the node wrote it
        entries.sort(key=lambda e: e[5])
        rows = []
        for actor, action, obj, outcome, detail, at in entries:
            seq += 1
            h = audit._digest(prev, seq, at, actor, action, obj, outcome, detail)
            rows.append((seq, stamp(at), actor, action, obj, outcome, detail, prev, h))
            prev = h
        sd.put("messages", ("id", "subsystem", "type", "sender_unit", "classification", "clearance", "urgency",
                            "in_reply_to", "conversation_id", "api_key_id", "source", "summary", "envelope_xml",
                            "accepted_at"), msgs)
        sd.put("deliveries", ("id", "message_id", "unit", "unit_name", "copy_type", "copy_no", "route_kind",
                              "target", "status", "remote_ref", "remote_id", "signer", "receipt_no", "reason",
                              "last_error", "delivered_at", "signed_at", "updated_at"), dels)
        sd.put("receipts", ("delivery_id", "action", "signer", "receipt_no", "reason", "time", "source",
                            "received_at"), recs)
        sd.put("outbox", ("id", "kind", "delivery_id", "target", "conversation", "payload", "priority", "state",
                          "attempts", "next_attempt_at", "lease_until", "claimed_by", "last_error", "created_at",
                          "finished_at"), obx)
        sd.put("ingested", ("key", "adapter", "outcome", "at"), ing)
        sd.put("idempotency", ("api_key_id", "key", "request_hash", "message_id", "created_at"), idem)
        sd.put("blob_claims", ("sha256", "claimed_at"), claims)
        sd.put("audit_log", ("seq", "at", "actor", "action", "object", "outcome", "detail", "prev_hash", "hash"),
               rows)
        for name, got in (("messages", msgs), ("deliveries", dels), ("receipts", recs), ("outbox", obx),
                          ("ingested", ing), ("idempotency", idem), ("blob_claims", claims), ("audit_log", rows)):
            counts[name] += len(got)
        c.log(f"seeded {min(n, start + chunk):,}/{n:,} documents")
    # the job history: the receipts poll every five minutes for a year, as [schedules.receipts]
    # runs it in config/prefecture.toml (here under the bench's own no-op job's name)
    ticks = int(365 * 288 * n / 200_000)
    for start in range(0, ticks, chunk):
        runs = []
        for j in range(start, min(ticks, start + chunk)):
            t = now - timedelta(minutes=5 * (ticks - j))
            runs.append((NOOP_JOB, stamp(t), "schedule", "node-1:4242", "ok", json.dumps({"polled": 3}), stamp(t),
                         stamp(t + timedelta(seconds=2))))
        sd.put("job_runs", ("job", "tick", "trigger", "instance", "outcome", "detail", "started_at", "finished_at"),
               runs)
    counts["job_runs"] = ticks
    if pg:  # the sequences past the ids given explicitly
        with node.db.begin() as s:
            for t in ("deliveries", "outbox"):
                s.execute(_text(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT max(id) FROM {t}))"))
    with node.db.engine.connect() as conn:  # planner statistics, as autovacuum / a DBA's ANALYZE keep them
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    return counts


def _text(sql: str) -> Any:
    from sqlalchemy import text

    return text(sql)


# -- statements and their plans ----------------------------------------------------------
class Capture:
    """The statements SQLAlchemy sends while a path runs (the accept path's driver-level
    statements are not seen: it is timed only)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.engine, self.on = engine, False
        self.seen: list[tuple[str, Any]] = []
        event.listen(engine, "before_cursor_execute", self._before)

    def _before(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if self.on and not executemany and statement.lstrip().split(None, 1)[0].upper() in (
                "SELECT", "UPDATE", "DELETE", "WITH", "INSERT"):
            self.seen.append((statement, parameters))


def explain(node: Any, statement: str, params: Any, sizes: dict[str, int]) -> tuple[list[str], list[str]]:
    """(plan lines, big tables read in full). Run in a transaction that is rolled back.

    PostgreSQL: a Seq Scan of a table of 10,000 rows or more (below that the planner rightly
    prefers one). SQLite: a SCAN of such a table (not a search of an index) in a statement that
    took at least one virtual-machine step per row of that table (counted by a progress
    handler while the statement runs), so that ``ORDER BY seq DESC LIMIT 1``, which SQLite
    shows as a SCAN and which stops at the first row, is not counted."""
    raw = node.db.engine.raw_connection()
    try:
        cur = raw.cursor()
        if node.db.postgres:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            lines = [r[0] for r in cur.fetchall()]
            full = sorted({m for ln in lines for m in re.findall(r"Seq Scan on (\w+)", ln)
                           if sizes.get(m, 0) >= 10_000})
        else:
            cur.execute("EXPLAIN QUERY PLAN " + statement, params)
            lines = [r[3] for r in cur.fetchall()]
            scanned = {m.group(1) for ln in lines if (m := re.match(r"SCAN (\w+)(?!.* USING .*INDEX)", ln))}
            dbapi = raw.driver_connection
            dbapi.execute("BEGIN")  # autocommit mode otherwise: what the statement changes is undone below
            steps = [0]

            def tick() -> int:
                steps[0] += 1
                return 0
            dbapi.set_progress_handler(tick, 1)
            try:
                cur.execute(statement, params)
                cur.fetchall()
            finally:
                dbapi.set_progress_handler(None, 1)
            lines.append(f"({steps[0]:,} VM steps)")
            full = sorted(t for t in scanned if sizes.get(t, 0) >= 10_000 and steps[0] >= sizes[t])
            dbapi.execute("ROLLBACK")
            return lines, full
        raw.rollback()
        return lines, full
    finally:
        raw.close()


class Report:
    def __init__(self, node: Any, label: str, plans: bool) -> None:
        self.node, self.label, self.plans = node, label, plans
        self.cap = Capture(node.db.engine)
        with node.db.engine.connect() as conn:
            self.sizes = {t: conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one() for t in BIG}
        self.rows: list[dict[str, Any]] = []

    def path(self, name: str, fn: Callable[[], Any], repeat: int = 3) -> Any:
        times, out = [], None
        self.cap.seen.clear()
        for i in range(repeat):
            self.cap.on = i == 0
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            self.cap.on = False
        stmts = list(self.cap.seen)
        full: set[str] = set()
        lines_out = []
        for st, params in stmts:
            try:
                lines, f = explain(self.node, st, params, self.sizes)
            except Exception as exc:  # noqa: BLE001  (a statement EXPLAIN cannot take: shown, not fatal)
                lines, f = [f"(no plan: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"], []
            full.update(f)
            lines_out.append((st, lines, f))
        ms = statistics.median(times) * 1000
        self.rows.append({"path": name, "ms": round(ms, 2), "statements": len(stmts), "full_scans": sorted(full)})
        flag = f"  FULL SCAN of {', '.join(sorted(full))}" if full else ""
        print(f"{self.label:10} {name:48} {ms:10.2f} ms  {len(stmts):3} stmts{flag}", flush=True)
        if self.plans or full:
            for st, lines, f in lines_out:
                if self.plans or f:
                    print("    SQL: " + " ".join(st.split())[:400])
                    for ln in lines[:25]:
                        print("      " + ln)
        return out


# -- the node ----------------------------------------------------------------------------
def make_node(tmp: Path, db_url: str) -> tuple[Any, Path, dict[str, str]]:
    from gateway import config as config_mod
    from gateway import migrate
    from gateway.api.auth import create_key
    from gateway.node import Node

    cfg_path = c.write_node_config(tmp / "node.toml", c.node_config(tmp / "data", db_url))
    migrate.upgrade(db_url)
    node = Node(config_mod.load(cfg_path))
    keys = {"admin": create_key(node.db, name="办公系统", scopes=["*"], clearance="绝密", actor="bench")}
    for i in range(4):  # calling systems, each seeing its own documents only
        keys[f"caller{i}"] = create_key(node.db, name=f"业务系统{i}", clearance="机密", actor="bench",
                                        scopes=["documents:send", "documents:read", "documents:recall"],
                                        units=[c.PREFECTURE])
    return node, cfg_path, keys


def template(node: Any, key: str) -> dict[str, Any]:
    """One real accept: the envelope, summary and audit detail the seeded rows copy."""
    from sqlalchemy import select

    from gateway.models import AuditEntry, Message

    sha = c.store_blob(node, c.body_bytes(4096), key)
    ids = c.accept_direct(node, [json.dumps(c.document(sha, c.make_units(3, start=100))).encode()], key)
    with node.db.sessions() as s:
        m = s.get(Message, ids[0])
        detail = s.scalar(select(AuditEntry.detail).where(AuditEntry.action == "message.accept"))
        return {"xml": m.envelope_xml, "summary": m.summary, "detail": detail, "sha": sha}


def accept_mean(node: Any, key: str, tpl: dict[str, Any], tag: str, count: int = 60) -> float:
    """Milliseconds an accept of a 3-copy document takes, each in its own transaction."""
    docs = [json.dumps(c.document(tpl["sha"], c.make_units(3, start=100), message_id=f"vol-{tag}-{i}")).encode()
            for i in range(count)]
    t0 = time.perf_counter()
    c.accept_direct(node, docs, key, batch=1)
    return (time.perf_counter() - t0) / count * 1000


#: run in the child: this checkout's gateway CLI (python -c puts the working directory first on
#: sys.path), and its peak RSS (VmHWM: of this program only; the rusage of a child counts the
#: pages it shared with the forked benchmark before exec) on stderr at exit
_CLI = ("import atexit, re, sys\n"
        "def hwm():\n"
        "    m = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())\n"
        "    print(f'vmhwm-kb {m.group(1)}', file=sys.stderr)\n"
        "atexit.register(hwm)\n"
        "from gateway.cli import main\n"
        "main()\n")


def cli(cfg: Path, *args: str) -> tuple[float, float, str]:
    """``gateway --config CFG ARGS``: (seconds, peak RSS in MB, last line of output)."""
    t0 = time.perf_counter()
    p = subprocess.run([c.PY, "-c", _CLI, "--config", str(cfg), *args], capture_output=True, text=True, cwd=c.REPO)
    secs = time.perf_counter() - t0
    m = re.search(r"vmhwm-kb (\d+)", p.stderr)
    lines = (p.stdout + p.stderr.replace(m.group(0), "") if m else p.stdout + p.stderr).strip().splitlines()
    return secs, int(m.group(1)) / 1024 if m else float("nan"), (lines[-1] if lines else "")[:160]


def measure(label: str, tmp: Path, db_url: str, n: int, plans: bool) -> dict[str, Any]:
    from alembic import command
    from sqlalchemy import select

    from gateway import deadletter, inbound, migrate, prune, retention
    from gateway.app import create_app
    from gateway.federation import reconcile
    from gateway.models import Delivery, Message
    from gateway.worker import Outcome, Worker
    from gateway.envelope import Receipt
    from systems.documents import assessment

    node, cfg, keys = make_node(tmp, db_url)
    tpl = template(node, keys["admin"])
    empty_ms = accept_mean(node, keys["admin"], tpl, "empty")
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    kids = [c.key_id(k) for k in keys.values()]
    counts = seed(node, n, kids, tpl, now)
    seed_s = time.perf_counter() - t0
    c.log(f"{label}: seeded in {seed_s:.0f} s: {counts}")
    rep = Report(node, label, plans)
    app = create_app(node=node)
    client = app.test_client()
    hdr = {k: {"Authorization": f"Bearer {v}"} for k, v in keys.items()}

    def get(url: str, who: str = "admin") -> Any:
        r = client.get(url, headers=hdr[who])
        assert r.status_code == 200, (url, r.status_code, r.get_data(as_text=True)[:300])
        return r.get_json()

    with node.db.sessions() as s:
        old = s.execute(select(Message.id, Message.accepted_at, Message.api_key_id)
                        .order_by(Message.accepted_at).offset(n // 10).limit(1)).one()
        copy = s.execute(select(Delivery.message_id, Delivery.unit, Delivery.remote_ref)
                           .where(Delivery.status == "delivered").limit(1)).one()
    import base64
    deep = base64.urlsafe_b64encode(json.dumps([old.accepted_at.isoformat(), old.id]).encode()).decode()

    rep.path("GET /documents (admin, newest 50)", lambda: get("/api/v1/documents"))
    rep.path("GET /documents (a caller's own)", lambda: get("/api/v1/documents", "caller1"))
    for st in ("failed", "queued", "signed"):
        rep.path(f"GET /documents?status={st}", lambda st=st: get(f"/api/v1/documents?status={st}"))
    rep.path("GET /documents?cursor= (90% deep, admin)", lambda: get(f"/api/v1/documents?cursor={deep}"))
    who = next(k for k, v in keys.items() if c.key_id(v) == old.api_key_id)
    rep.path("GET /documents?cursor= (90% deep, its caller)", lambda: get(f"/api/v1/documents?cursor={deep}", who))
    rep.path("GET /documents?status=failed&cursor= (deep)",
             lambda: get(f"/api/v1/documents?status=failed&cursor={deep}"))
    rep.path("GET /documents/{id} (with receipts)", lambda: get(f"/api/v1/documents/{old.id}"))

    # the accept with big tables (index maintenance), against the same on empty ones, and
    # the Idempotency-Key lookup
    accept_ms = accept_mean(node, keys["admin"], tpl, "full")
    print(f"{label:10} {'accept (pipeline.accept, 3 copies), mean':48} {accept_ms:10.2f} ms  "
          f"(empty tables: {empty_ms:.2f} ms)", flush=True)
    rep.rows.append({"path": "accept", "ms": round(accept_ms, 2), "empty_ms": round(empty_ms, 2)})
    body = json.dumps(c.document(tpl["sha"], c.make_units(3, start=100)))
    first = client.post("/api/v1/documents", data=body, content_type="application/json",
                        headers={**hdr["admin"], "Idempotency-Key": "vol-idem"})
    assert first.status_code == 202, first.get_data(as_text=True)
    rep.path("POST /documents (Idempotency-Key replay)", lambda: client.post(
        "/api/v1/documents", data=body, content_type="application/json",
        headers={**hdr["admin"], "Idempotency-Key": "vol-idem"}))
    rid = first.get_json()["id"]
    rep.path("POST /documents/{id}/recall", lambda: client.post(f"/api/v1/documents/{rid}/recall",
                                                                  headers=hdr["admin"]), repeat=1)

    w = Worker(node, worker_id="vol-worker")

    def claim_and_record() -> None:
        jobs = w.claim(8)
        w.record([Outcome(j, remote_id=f"R-{j.id}") for j in jobs if j.kind == "deliver"])

    rep.path("worker claim 8 + record", claim_and_record)
    rep.path("worker reap expired leases", w.reap_expired_leases)
    rep.path("gateway outbox list (dead, 50)", lambda: deadletter.dead_letters(node.db, limit=50))

    def match(by_ref: bool) -> None:
        with node.db.begin() as s:
            r = Receipt(action="SIGNED", remote_ref=copy.remote_ref if by_ref else None,
                        message_id=None if by_ref else copy.message_id, unit=copy.unit)
            assert inbound.find_delivery(s, r, "docexchange") is not None
    rep.path("receipt → delivery (remote_ref: SOAP, SFTP)", lambda: match(True))
    rep.path("receipt → delivery (message id + unit: box)", lambda: match(False))

    rep.path("job prune (first run: 5 days of done rows)", lambda: prune.run(node, now), repeat=1)
    rep.path("job prune (daily: nothing more)", lambda: prune.run(node, now))
    rep.path("blobs: claims scan, first run (every message)", lambda: retention.scan_claims(node), repeat=1)
    rep.path("blobs: claims scan, next run (one day)", lambda: retention.scan_claims(node))
    month = now - timedelta(days=30)
    rep.path("report sign-for (one month)",
             lambda: assessment.sign_for(node.db, month, now, 24, now), repeat=1)
    rep.path("reconcile: open copies for a peer", lambda: reconcile._open_copies(node, "county-a"))
    from gateway.federation import directory
    rep.path("directory: newest version", lambda: directory._newest_row(node))

    from gateway import scheduler
    scheduler.register(NOOP_JOB, lambda node: {}, "does nothing: the scheduler's own statements")
    rep.path("scheduler: a job's run (lock, stale runs, record)",
             lambda: scheduler.run_job(node, NOOP_JOB, trigger="manual"))
    rep.path("scheduler: last runs (gateway sync --list)", lambda: scheduler.last_runs(node, [NOOP_JOB]))

    # the audit chain, verified by the CLI as an operator runs it
    secs, rss, line = cli(cfg, "audit", "verify")
    print(f"{label:10} {'gateway audit verify':48} {secs * 1000:10.0f} ms  peak RSS {rss:.0f} MB: {line}",
          flush=True)
    rep.rows.append({"path": "audit verify", "ms": round(secs * 1000), "peak_rss_mb": round(rss), "out": line})
    from gateway.migrate import _script
    head = _script()[0]
    prev = f"{int(head) - 1:04d}"
    node.close()
    command.downgrade(migrate.alembic_config(db_url), prev)
    secs, rss, line = cli(cfg, "db", "upgrade")
    print(f"{label:10} {f'gateway db upgrade ({prev} → {head})':48} {secs * 1000:10.0f} ms: {line}", flush=True)
    rep.rows.append({"path": f"db upgrade {prev}->{head}", "ms": round(secs * 1000)})
    return {"backend": label, "seed_seconds": round(seed_s), "rows": counts, "paths": rep.rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 documents (1/20 of a year)")
    ap.add_argument("--scale", type=float, default=None, help="documents = 200,000 × SCALE")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--plans", action="store_true", help="print every statement's plan, not only full scans")
    ap.add_argument("--json", type=Path, help="write the figures to this file too")
    a = ap.parse_args()
    c.install_cleanup()
    n = int(200_000 * (a.scale if a.scale is not None else 0.05 if a.quick else 1.0))
    results = []
    if not a.no_sqlite:
        tmp = c.tempdir("volume-sqlite")
        results.append(measure("sqlite", tmp, f"sqlite:///{tmp / 'data' / 'gateway.db'}", n, a.plans))
    if not a.no_postgres:
        pg = c.PgCluster()
        url = pg.start()
        results.append(measure("postgres", c.tempdir("volume-pg"), url, n, a.plans))
    if a.json:
        a.json.write_text(json.dumps(results, ensure_ascii=False, indent=1))
    scans = sorted({f"{r['backend']}:{p['path']}" for r in results for p in r["paths"] if p.get("full_scans")})
    print(f"volume: {n:,} documents; paths with a full scan of a big table: {len(scans)}"
          + (f" ({'; '.join(scans)})" if scans else ""))


if __name__ == "__main__":
    c.run(main)
