"""The accept path writes its rows at the driver level (gateway.pipeline._Sql, for speed while
every other writer waits). These tests hold it to what SQLAlchemy's models would have stored:
the same text/JSON/timestamp representations, read back by the ORM unchanged, and an audit
chain that still verifies after driver-level and ORM appends are interleaved."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text

from gateway import audit
from gateway.db import Database
from gateway.models import AuditEntry, Delivery, IdempotencyRecord, Message, OutboxEntry
from adapters.base import remote_ref
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, EMERGENCY, PREFECTURE
from tests.plugins.groupcommit import in_one_group


def _raw(node, sql: str, **params):  # type: ignore[no-untyped-def]
    with node.db.engine.connect() as c:
        return c.execute(text(sql), params).one()


@pytest.mark.parametrize("idem", ["fmt-1", None], ids=["pipeline", "one-message"])
def test_rows_written_by_the_driver_match_what_the_orm_writes(api, gw_node, idem):
    """With an Idempotency-Key the accept reads before it writes (psycopg's pipeline on
    PostgreSQL); without one it only writes, and its group goes in one message
    (gateway.pgbatch, with its own parameter encoding): the rows are the same either way."""
    r = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A, CITY_B), title="存储格式核对"),
                 headers={"Idempotency-Key": idem} if idem else {})
    assert r.status_code == 202, r.get_json()
    mid = r.get_json()["id"]
    # the same kind of rows through the ORM, as reference
    at = datetime(2026, 11, 26, 8, 30, 1, 123456, tzinfo=UTC)
    with gw_node.db.begin() as s:
        s.add(Message(id="ref-orm", subsystem="documents", type="document", sender_unit=COUNTY_A,
                      classification="非密", clearance=0, urgency="平件", api_key_id=None, source="api",
                      summary={"title": "存储格式核对", "doc_number": None}, envelope_xml=b"<x/>", accepted_at=at))
        s.flush()
        s.add(Delivery(message_id="ref-orm", unit=CITY_B, route_kind="adapter", target="rec", status="queued",
                       remote_ref="r", updated_at=at))
        s.add(IdempotencyRecord(api_key_id="k", key="fmt-ref", request_hash="h", message_id="ref-orm", created_at=at))
        audit.append(s, actor="test", action="reference", obj="message:ref-orm")

    ours = _raw(gw_node, "SELECT accepted_at, summary FROM messages WHERE id = :i", i=mid)
    ref = _raw(gw_node, "SELECT accepted_at, summary FROM messages WHERE id = 'ref-orm'")
    if gw_node.db.postgres:
        assert type(ours[0]) is type(ref[0]) and ours[0].tzinfo is not None
        assert ours[1] == {"doc_number": ours[1]["doc_number"], "title": "存储格式核对", "doc_type": "通知"}  # noqa: E501
        raw = _raw(gw_node, "SELECT summary::text, (SELECT summary::text FROM messages WHERE id = 'ref-orm') "
                            "FROM messages WHERE id = :i", i=mid)
        assert all('"存储格式核对"' in t for t in raw), raw  # UTF-8, not \uXXXX escapes
    else:  # text in one format: 'YYYY-MM-DD HH:MM:SS.ffffff', as SQLAlchemy writes it
        assert len(ours[0]) == len(ref[0]) == 26 and ours[0][10] == ref[0][10] == " "
        assert ref[0] == "2026-11-26 08:30:01.123456"
        import json
        assert json.loads(ours[1])["title"] == "存储格式核对"
        # Chinese stored as UTF-8, by the driver and by the ORM alike, not as \uXXXX escapes
        assert '"存储格式核对"' in ours[1] and '"存储格式核对"' in ref[1]
    for table, col, key in (("deliveries", "updated_at", "message_id"),
                            *((("idempotency", "created_at", "message_id"),) if idem else ())):
        a = _raw(gw_node, f"SELECT {col} FROM {table} WHERE {key} = :i LIMIT 1", i=mid)[0]
        b = _raw(gw_node, f"SELECT {col} FROM {table} WHERE {key} = 'ref-orm' LIMIT 1")[0]
        assert type(a) is type(b) and (gw_node.db.postgres or len(a) == len(b))

    with gw_node.db.sessions() as s:
        m = s.get(Message, mid)
        assert m is not None and m.accepted_at.tzinfo is not None
        assert abs((datetime.now(UTC) - m.accepted_at).total_seconds()) < 60
        assert m.summary["title"] == "存储格式核对" and m.urgency == "加急"
        assert [(d.unit, d.status, d.updated_at.tzinfo is not None) for d in m.deliveries] == [
            (COUNTY_A, "queued", True), (CITY_B, "queued", True)]
        rows = s.scalars(select(OutboxEntry).where(OutboxEntry.delivery_id.in_([d.id for d in m.deliveries]))).all()
        assert [(o.kind, o.state, o.attempts, o.next_attempt_at.tzinfo is not None) for o in rows] == [
            ("deliver", "pending", 0, True)] * 2
        entry = s.scalars(select(AuditEntry).where(AuditEntry.object == f"message:{mid}")).one()
        assert entry.at.tzinfo is not None and '"recipients":2' in entry.detail

    # the chain verifies across driver-level and ORM appends, in any order
    assert api.post("/api/v1/documents", json=api.document()).status_code == 202
    with gw_node.db.sessions() as s:
        result = audit.verify(s)
    assert result.ok, result.problem
    assert result.entries >= 4


def test_deliveries_and_their_outbox_rows_keep_the_envelope_order(api, gw_node):
    """The driver-level statements write one delivery per recipient in envelope order with
    its own values, and one deliver row per copy in that order."""
    doc = api.document()
    doc["recipients"] = [
        {"unit": CITY_B, "name": "乙市人民政府办公室", "copy_type": "抄送", "copy_no": "000007"},
        {"unit": COUNTY_A, "copy_type": "主送"},
        {"unit": EMERGENCY, "name": "州应急管理局", "copy_type": "抄报"},
        {"unit": PREFECTURE, "copy_no": "000002"},
    ]
    r = api.post("/api/v1/documents", json=doc)
    assert r.status_code == 202, r.get_json()
    mid = r.get_json()["id"]
    assert [x["unit"] for x in r.get_json()["recipients"]] == [x["unit"] for x in doc["recipients"]]
    with gw_node.db.sessions() as s:
        ds = s.scalars(select(Delivery).where(Delivery.message_id == mid).order_by(Delivery.id)).all()
        assert [(d.unit, d.unit_name, d.copy_type, d.copy_no, d.route_kind, d.target, d.status, d.remote_ref)
                for d in ds] == [
            (CITY_B, "乙市人民政府办公室", "抄送", "000007", "adapter", "rec2", "queued", remote_ref(mid, CITY_B)),
            (COUNTY_A, None, "主送", None, "adapter", "rec", "queued", remote_ref(mid, COUNTY_A)),
            (EMERGENCY, "州应急管理局", "抄报", None, "adapter", "rec", "queued", remote_ref(mid, EMERGENCY)),
            (PREFECTURE, None, "主送", "000002", "adapter", "rec", "queued", remote_ref(mid, PREFECTURE))]
        rows = s.scalars(select(OutboxEntry).where(OutboxEntry.delivery_id.in_([d.id for d in ds]))
                         .order_by(OutboxEntry.id)).all()
        ids = [d.id for d in ds]
        assert [(o.kind, o.delivery_id, o.target, o.priority, o.state) for o in rows] == [
            ("deliver", ids[0], "rec2", 1, "pending"), ("deliver", ids[1], "rec", 1, "pending"),
            ("deliver", ids[2], "rec", 1, "pending"), ("deliver", ids[3], "rec", 1, "pending")]


def test_a_message_to_more_units_than_one_statement_takes_is_stored_table_by_table(api, gw_node, monkeypatch):
    """On PostgreSQL a message to up to ONE_STATEMENT_MAX units is stored by one statement;
    beyond, by one statement per table (the same rows, in the same order)."""
    from gateway import pipeline

    monkeypatch.setattr(pipeline, "ONE_STATEMENT_MAX", 2)
    one_statement: list[int] = []
    real = pipeline._Sql.accept_one
    monkeypatch.setattr(pipeline._Sql, "accept_one", lambda self, n: (one_statement.append(n), real(self, n))[1])
    units = [CITY_B, COUNTY_A, EMERGENCY, PREFECTURE]
    for n in (2, 4):  # one statement, then table by table
        r = api.post("/api/v1/documents", json=api.document(recipients=units[:n]))
        assert r.status_code == 202, r.get_json()
        mid = r.get_json()["id"]
        with gw_node.db.sessions() as s:
            ds = s.scalars(select(Delivery).where(Delivery.message_id == mid).order_by(Delivery.id)).all()
            assert [d.unit for d in ds] == units[:n]
            rows = s.scalars(select(OutboxEntry).where(OutboxEntry.delivery_id.in_([d.id for d in ds]))
                             .order_by(OutboxEntry.id)).all()
            assert [o.delivery_id for o in rows] == [d.id for d in ds]
            entry = s.scalars(select(AuditEntry).where(AuditEntry.object == f"message:{mid}")).one()
            assert f'"recipients":{n}' in entry.detail
            assert audit.verify(s).ok
    assert one_statement == ([2] if gw_node.db.postgres else [])


def test_outcomes_recorded_by_the_driver_read_back_like_orm_rows(api, gw_node):
    """The worker records successful deliveries on the driver's cursor too (Worker._record_delivered)."""
    from gateway.worker import Worker

    r = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A, CITY_B)))
    mid = r.get_json()["id"]
    Worker(gw_node).drain()
    with gw_node.db.sessions() as s:
        m = s.get(Message, mid)
        assert m is not None
        assert [(d.status, d.remote_id is not None) for d in m.deliveries] == [("delivered", True)] * 2
        for d in m.deliveries:
            assert d.delivered_at is not None and d.delivered_at.tzinfo is not None
            assert abs((datetime.now(UTC) - d.delivered_at).total_seconds()) < 60
        rows = s.scalars(select(OutboxEntry).where(OutboxEntry.delivery_id.in_([d.id for d in m.deliveries]))).all()
        assert [(o.state, o.attempts, o.finished_at is not None) for o in rows] == [("done", 1, True)] * 2
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action == "delivery.attempt",
                                                     AuditEntry.object.like(f"delivery:{mid}/%"))).all()
        assert sorted(e.object for e in entries) == sorted(f"delivery:{mid}/{u}" for u in (COUNTY_A, CITY_B))
        assert all(e.outcome == "delivered" for e in entries)
        assert audit.verify(s).ok
    if not gw_node.db.postgres:  # the same text format as the ORM writes
        ours = _raw(gw_node, "SELECT delivered_at FROM deliveries WHERE message_id = :i LIMIT 1", i=mid)[0]
        assert len(ours) == 26 and ours[10] == " "


def test_a_race_lost_at_the_driver_is_answered_like_a_replay(gw_node, monkeypatch):
    """The accept statements run on the driver's cursor, so a unique violation from a racing
    identical request (PostgreSQL: two transactions both found no row and both inserted)
    is the driver's IntegrityError, not SQLAlchemy's; accept must still retry and answer
    as for a replay, never fail."""
    from gateway import pipeline
    from systems.documents import payload
    from systems.documents.schemas import DocumentIn
    from tests.plugins.gatewaynode import Api

    api = Api(gw_node)
    first = api.post("/api/v1/documents", json=api.document(title="竞争"))
    assert first.status_code == 202
    mid = first.get_json()["id"]
    real_store = pipeline._store
    calls = []

    def store(s, env, plan, idem):  # type: ignore[no-untyped-def]
        calls.append(env.message_id)
        if len(calls) == 1:
            raise gw_node.db.engine.dialect.dbapi.IntegrityError("duplicate key value violates unique constraint")
        return real_store(s, env, plan, idem)

    monkeypatch.setattr(pipeline, "_store", store)
    doc = DocumentIn.model_validate(api.document(title="竞争"))
    env = payload.to_envelope(doc, message_id=mid, node_id=gw_node.id,
                              sizes={doc.body["sha256"]: gw_node.blobs.size(doc.body["sha256"])})
    got = pipeline.accept(gw_node, env, actor="test", api_key_id=api.key.split("_", 2)[1])
    assert calls == [mid, mid] and got.created is False and got.message.id == mid


def test_entries_chained_by_the_driver_verify_from_the_first_one(database_url):
    """On PostgreSQL a single entry is chained by the server (no read of the head first):
    its hash must be exactly what verify() computes, from the very first entry on (the
    genesis case) and after entries appended through the ORM."""
    from gateway import migrate
    from gateway.db import Database

    migrate.upgrade(database_url)
    db = Database(database_url)
    try:
        def append(detail):  # type: ignore[no-untyped-def]
            def unit(conn):  # type: ignore[no-untyped-def]
                cur = conn.connection.cursor()
                audit.append_driver(cur, db.postgres, [audit.Record("test", "driver", "x", detail=detail)])
                cur.close()
            db.write(unit)

        append({"n": 1, "标题": "第一条"})
        with db.begin() as s:
            audit.append(s, actor="test", action="orm", obj="y")
        append({"n": 3})
        with db.sessions() as s:
            result = audit.verify(s)
            rows = s.execute(select(AuditEntry.seq, AuditEntry.action, AuditEntry.prev_hash)
                             .order_by(AuditEntry.seq)).all()
        assert result.ok, result.problem
        assert [(r.seq, r.action) for r in rows] == [(1, "driver"), (2, "orm"), (3, "driver")]
        assert rows[0].prev_hash == audit.GENESIS
    finally:
        db.dispose()


def test_only_an_id_the_gateway_did_not_make_is_looked_up(api, gw_node, monkeypatch):
    """A message id generated for this very request (UUIDv7) cannot be taken, so its accept
    skips the lookup; an id chosen by the caller is still checked (idempotency)."""
    from gateway import pipeline
    from gateway.db import driver_mark

    sql = pipeline._SQL[gw_node.db.postgres]
    monkeypatch.setattr(sql, "existing", f"SELECT no_such_column FROM messages WHERE id = {driver_mark(sql.postgres)}")
    r = api.post("/api/v1/documents", json=api.document())
    assert r.status_code == 202, r.get_json()
    r = api.post("/api/v1/documents", json=api.document(message_id="caller-chosen-0001"))
    assert r.status_code == 500  # the broken lookup ran
    assert api.post("/api/v1/documents", json=api.document()).status_code == 202  # and nothing was left broken


def test_a_group_of_accepts_shares_one_pipeline_and_a_refused_one_is_undone_alone(api, gw_node, monkeypatch):
    """Accepts waiting for the same commit form one group; on PostgreSQL their statements
    travel in one pipeline (accepts that read first: an Idempotency-Key), or in one message
    (accepts that only write: a new id, no key). One of them refused inside the transaction
    (an Idempotency-Key reused with another body) sends the group to its unit-by-unit run:
    the others are stored once, the refused one not at all, and the audit chain verifies."""
    from gateway import pgbatch

    db = gw_node.db
    messages: list[list[str]] = []  # the statements of each transaction sent in one message
    real_send = pgbatch.send_transaction
    monkeypatch.setattr(pgbatch, "send_transaction", lambda pg, statements, *a: (
        messages.append([q.split(" (")[0] for q, _ in statements]), real_send(pg, statements, *a))[1])
    groups: list[tuple[int, bool]] = []
    real = Database._group_pipeline

    def counting(self, conn, batch):  # type: ignore[no-untyped-def]
        groups.append((len(batch), self.postgres and all(j.pipelined for j in batch)))
        return real(self, conn, batch)

    monkeypatch.setattr(Database, "_group_pipeline", counting)
    opened: list[int] = []  # psycopg pipelines entered
    sent: list[tuple[str, bool]] = []  # (statement, inside a pipeline) on the group's connection
    if db.postgres:
        import psycopg

        real_pipeline = psycopg.Connection.pipeline
        monkeypatch.setattr(psycopg.Connection, "pipeline",
                            lambda self: (opened.append(1), real_pipeline(self))[1])
        real_execute = psycopg.Cursor.execute

        def recording(self, query, params=None, **kw):  # type: ignore[no-untyped-def]
            if db._gconn is not None and self.connection is db._gconn.connection.dbapi_connection:
                sent.append((str(query).split(" (")[0], self.connection._pipeline is not None))
            return real_execute(self, query, params, **kw)

        monkeypatch.setattr(psycopg.Cursor, "execute", recording)
    assert api.post("/api/v1/documents", json=api.document(title="组提交-原件"),
                    headers={"Idempotency-Key": "group-key"}).status_code == 202

    def one_group(requests: list[tuple[dict, dict]]) -> list:  # type: ignore[type-arg]
        """The requests' accepts in one group (tests/plugins/groupcommit.py)."""
        def post(doc: dict, headers: dict):  # type: ignore[no-untyped-def,type-arg]
            return lambda: api.app.test_client().post("/api/v1/documents", json=doc,
                                                      headers={**api.headers, **headers})

        return in_one_group(db, [post(doc, headers) for doc, headers in requests],
                            on_queued=lambda: (opened.clear(), sent.clear(), messages.clear()))

    ok = one_group([(api.document(title=f"组提交-{i}"), {"Idempotency-Key": f"group-{i}"}) for i in range(4)])
    assert [r.status_code for r in ok] == [202] * 4
    assert len(opened) == (1 if db.postgres else 0) and messages == []  # not one per accept
    if db.postgres:
        # the group's BEGIN and COMMIT travel in its pipeline, and the audit chain's lock is
        # taken once for the transaction, not once per accept
        group = sent[sent.index(("BEGIN", True)):]  # what came before closed the holding unit's
        assert group[-1] == ("COMMIT", True) and all(inside for _, inside in group), sent
        assert [q for q, _ in group].count("SELECT pg_advisory_xact_lock(1734440292)") == 1, sent
        # each accept's rows (message, delivery, outbox row, audit entry) in one statement
        assert [q for q, _ in group].count("WITH new_message AS") == 4, sent
    mixed = one_group([(api.document(title=f"组提交-{i}"), {}) for i in range(4, 7)]
                      + [(api.document(title="组提交-另一份"), {"Idempotency-Key": "group-key"})])
    assert [r.status_code for r in mixed] == [202, 202, 202, 422]
    assert mixed[3].get_json()["type"].endswith("idempotency-key-reused")
    assert messages == []  # one accept of the group reads: the group takes psycopg's pipeline
    # each group was one commit; on PostgreSQL its units shared one pipeline
    assert (4, gw_node.db.postgres) in groups and (4, gw_node.db.postgres) == groups[-1]
    plain = one_group([(api.document(title=f"组提交-{i}"), {}) for i in range(7, 10)])
    assert [r.status_code for r in plain] == [202] * 3
    if db.postgres:
        # BEGIN, the lock, the three accepts' statements and COMMIT in one message; nothing
        # through psycopg on the group's connection but the holding unit's COMMIT
        assert opened == [] and sent == [("COMMIT", False)], sent
        assert messages == [["SELECT pg_advisory_xact_lock(1734440292)"] + ["WITH new_message AS"] * 3]
    else:
        assert messages == []
    with gw_node.db.sessions() as s:
        titles = [m.summary["title"] for m in s.scalars(select(Message).where(Message.summary.is_not(None)))]
        assert sorted(t for t in titles if t.startswith("组提交")) == sorted(
            ["组提交-原件"] + [f"组提交-{i}" for i in range(10)])
        for r in ok + mixed[:3] + plain:
            mid = r.get_json()["id"]
            ds = s.scalars(select(Delivery).where(Delivery.message_id == mid)).all()
            assert len(ds) == 1
            assert len(s.scalars(select(OutboxEntry).where(OutboxEntry.delivery_id == ds[0].id)).all()) == 1
            assert len(s.scalars(select(AuditEntry).where(AuditEntry.object == f"message:{mid}")).all()) == 1
        result = audit.verify(s)
    assert result.ok, result.problem
