"""Alembic migrations build exactly the schema the models describe, on both databases, and
step down and up again."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, MetaData, Table, create_engine, inspect, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from gateway import audit, migrate
from gateway.models import Base, Message


def test_migrations_match_the_models_and_go_down_and_up(database_url):
    migrate.upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        command.downgrade(migrate.alembic_config(database_url), "0001")
        assert not migrate.current_is_head(engine)
        migrate.upgrade(database_url)
        assert migrate.current_is_head(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize(("column", "revision"), [("envelope_xml", "0005"), ("summary", "0006")])
def test_postgresql_compresses_message_rows_with_lz4(database_url, column, revision):
    """Migrations 0005 and 0006: LZ4 for messages.envelope_xml and messages.summary
    (PostgreSQL 14+ built with it, as the test cluster is), pglz again after stepping below
    the migration that set it."""
    query = ("SELECT attcompression FROM pg_attribute "
             f"WHERE attrelid = 'messages'::regclass AND attname = '{column}'")
    migrate.upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql(query).scalar() == "l"
        command.downgrade(migrate.alembic_config(database_url), f"{int(revision) - 1:04d}")
        with engine.connect() as conn:
            assert conn.exec_driver_sql(query).scalar() == ""  # the server's default (pglz)
    finally:
        engine.dispose()


# -- upgrading a database that holds data ------------------------------------------------------
UNIT, COUNTY = "11522300GDR9YB9550", "1152230107CTPD8U2P"


def _rows(tables: dict[str, Table], now: datetime) -> dict[str, list[dict[str, Any]]]:
    """A few rows of every kind a node stores, for the tables of the revision at hand."""
    sha = [hashlib.sha256(f"正文 {i}".encode()).hexdigest() for i in range(3)]
    envelope = ("<?xml version='1.0' encoding='UTF-8'?>\n<envelope xmlns=\"urn:egov:gateway:envelope:v1\" "
                "version=\"1\"><payload>关于做好冬季值班工作的通知</payload><attachments>"
                + "".join(f'<attachment role="body" name="正文.ofd" size="9" sha256="{s}"/>' for s in sha)
                + "</attachments></envelope>").encode()
    rows: dict[str, list[dict[str, Any]]] = {
        "api_keys": [dict(id=f"key{i}", name=f"州OA {i}", secret_hash=f"{i}" * 64, scopes=["documents:send"],
                          clearance=1, units=[UNIT], webhook_url="http://127.0.0.1:9/hook" if i else None,
                          created_at=now, revoked_at=None) for i in range(2)],
        "messages": [dict(id=f"0193a1b2-c3d4-7e5f-8a9b-{i:012d}:prefecture", subsystem="documents", type="document",
                          sender_unit=UNIT, classification="非密", clearance=0, urgency="加急", in_reply_to=None,
                          conversation_id="初报" if i else None, api_key_id="key0", source="api",
                          summary={"title": f"关于{i}号的通知", "doc_number": f"州政办发〔2026〕{i}号"},
                          envelope_xml=envelope, accepted_at=now - timedelta(days=i)) for i in range(3)],
        "deliveries": [dict(id=i + 1, message_id=f"0193a1b2-c3d4-7e5f-8a9b-{i:012d}:prefecture", unit=COUNTY,
                            unit_name="某县政府办", copy_type="主送", copy_no="000001", route_kind="node",
                            target="county-a", status=("queued", "delivered", "signed")[i], remote_ref=f"ref-{i}",
                            remote_id=None, signer="张三" if i == 2 else None, receipt_no=None, reason=None,
                            last_error=None, delivered_at=now if i else None, signed_at=now if i == 2 else None,
                            updated_at=now) for i in range(3)],
        "outbox": [dict(id=i + 1, kind="forward", delivery_id=i + 1, target="county-a", payload={"units": [COUNTY]},
                        priority=2, state=("pending", "done", "dead")[i], attempts=i, next_attempt_at=now,
                        lease_until=None, claimed_by=None, last_error="timed out" if i == 2 else None,
                        created_at=now, finished_at=now if i else None) for i in range(3)],
        "receipts": [dict(id=1, delivery_id=3, action="SIGNED", signer="张三", receipt_no="签收-1", reason=None,
                          time=now, source="node:county-a", received_at=now)],
        "idempotency": [dict(api_key_id="key0", key=f"oa-2026-{i}", request_hash=f"{i}" * 64,
                             message_id=f"0193a1b2-c3d4-7e5f-8a9b-{i:012d}:prefecture", created_at=now)
                        for i in range(3)],
        "blobs": [dict(sha256=s, size=9, uploaded_by="key0" if i else None, created_at=now) for i, s in enumerate(sha)],
        "ingested": [dict(key="sftp:收文/1.xml", adapter="sftp", outcome="ok", at=now)],
        "adapter_state": [dict(adapter="sftp", key="cursor", value="2026-11-20T02:15:00+00:00")],
        "federation_nonces": [dict(key_id="county-a", nonce="n0nce", seen_at=now)],
        "directory": [dict(version=1764000000000, issuer="prefecture", issued_at=now, expires_at=now + timedelta(days=3),
                           document=b'{"issuer":"prefecture"}', signature="c2ln", fetched_at=now)],
        "job_runs": [dict(id=1, job="receipts", tick=now, trigger="schedule", instance="host:1", outcome="ok",
                          detail={"read": 3}, started_at=now, finished_at=now)],
        "blob_grants": [dict(sha256=sha[1], api_key_id="key0", created_at=now)],
        "blob_claims": [dict(sha256=sha[0], claimed_at=now)],
    }
    return {name: r for name, r in rows.items() if name in tables}


def _dump(conn: Connection, t: Table, columns: list[str]) -> list[tuple[Any, ...]]:
    pk = [c for c in t.primary_key.columns]
    return [tuple(r) for r in conn.execute(select(*(t.c[c] for c in columns)).order_by(*pk))]


def _older_revisions() -> list[str]:
    return sorted(r for r in migrate._script()[1] if r != migrate.head())


@pytest.mark.parametrize("revision", _older_revisions())
def test_an_upgrade_from_an_older_revision_keeps_every_row_and_the_audit_chain(database_url, revision):
    """A node that ran the version whose newest migration is ``revision`` holds messages,
    copies, the outbox, receipts, keys, blobs and a chained audit log; after `db upgrade`
    every row of every table is still there, column by column, and the chain verifies."""
    migrate.upgrade(database_url, revision)
    engine = create_engine(database_url)
    try:
        old = MetaData()
        old.reflect(engine)
        tables = {name: t for name, t in old.tables.items() if name != "alembic_version"}
        now = datetime(2026, 11, 20, 2, 15, tzinfo=UTC)
        with engine.begin() as conn:
            for name, rows in _rows(tables, now).items():
                conn.execute(tables[name].insert(), rows)
        with Session(engine) as s, s.begin():
            audit.append(s, actor="api:key0", action="message.accept", obj="message:1", detail={"标题": "通知"})
            audit.append(s, actor="worker", action="message.deliver", obj="delivery:1/x", outcome="delivered")
        with engine.connect() as conn:
            before = {name: _dump(conn, t, [c.name for c in t.columns]) for name, t in tables.items()}
        assert all(before[name] for name in _rows(tables, now))

        migrate.upgrade(database_url)

        assert migrate.current_is_head(engine)
        new = MetaData()
        new.reflect(engine)
        with engine.connect() as conn:
            for name, rows in before.items():
                assert _dump(conn, new.tables[name], [c.name for c in tables[name].columns]) == rows, name
            if "blob_grants" not in tables:  # 0008: each stored blob granted to the key that uploaded it
                assert conn.execute(text("SELECT sha256, api_key_id FROM blob_grants ORDER BY sha256")).all() == \
                    sorted((b["sha256"], b["uploaded_by"]) for b in _rows(tables, now)["blobs"] if b["uploaded_by"])
        with Session(engine) as s:
            result = audit.verify(s)
            assert result.ok and result.head.startswith("2:"), result
    finally:
        engine.dispose()


def test_a_failed_upgrade_leaves_the_database_at_its_revision_and_runs_again(database_url):
    """An upgrade cut short (here: 0003 meets a table in its way after it has created two of
    its own and added a column) changes nothing, on SQLite as on PostgreSQL: the next
    `db upgrade`, once the cause is gone, runs from the same revision to the newest."""
    migrate.upgrade(database_url, "0002")
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE job_runs (x INTEGER)")
        with pytest.raises(DBAPIError, match="job_runs"):
            migrate.upgrade(database_url)
        with engine.begin() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0002"
            conn.exec_driver_sql("DROP TABLE job_runs")
        tables = set(inspect(engine).get_table_names())
        assert not tables & {"federation_nonces", "directory"}
        assert "conversation" not in {c["name"] for c in inspect(engine).get_columns("outbox")}

        migrate.upgrade(database_url)

        assert migrate.current_is_head(engine)
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_content_named_before_a_rollback_is_kept_after_the_upgrade_that_follows(tmp_path, database_url):
    """A rollback steps the schema below 0011 (``blob_claims`` is dropped) and the upgrade that
    follows creates it empty: the ``blobs`` job must then read every stored message again, not
    only those since its last scan, or it removes the content of every older message."""
    from gateway import scheduler
    from gateway.node import Node
    from tests.plugins.gatewaynode import Api, node_config
    from tests.test_retention import _age, _document

    cfg = node_config(tmp_path, database_url, api={"unclaimed_upload_days": 30})
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node)
        body = api.upload("正文 ".encode() * 100)
        assert api.post("/api/v1/documents", json=_document(body, [])).status_code == 202
        with node.db.begin() as s:  # the document is 40 days old; its body was last used then
            s.execute(update(Message).values(accepted_at=datetime.now(UTC) - timedelta(days=40)))
        _age(node.blobs.path(body), 40)
        assert scheduler.run_job(node, "blobs", actor="test").detail["newly_claimed"] == 1
    finally:
        node.close()

    command.downgrade(migrate.alembic_config(cfg.database_url()), "0010")  # the rollback …
    migrate.upgrade(cfg.database_url())  # … and the upgrade again

    node = Node(cfg)
    try:
        result = scheduler.run_job(node, "blobs", actor="test")
        assert result.outcome == "ok", result.detail
        assert result.detail["removed"] == 0 and result.detail["newly_claimed"] == 1, result.detail
        assert node.blobs.exists(body)
    finally:
        node.close()
