"""Accepted means committed, on PostgreSQL as on SQLite: the server crashes while documents are
being accepted (every server process stops at once, leaving what sits in its shared memory,
WAL buffers included, unwritten), recovers from its WAL on the next start, and every document
that was answered 202 is there with its delivery, outbox row and audit entry, on an audit
chain that verifies. The server runs with PostgreSQL's own durability settings (fsync and
synchronous_commit on), not the fast ones of the other tests."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from gateway import audit, migrate
from gateway.db import Database
from gateway.models import AuditEntry, Delivery, Message, OutboxEntry
from gateway.node import Node
from tests.plugins.gatewaynode import Api, RecordingAdapter, node_config
from tests.plugins.postgres import PrivateCluster, _pg_bin
from tests.test_openapi_contract import _conforms

pytestmark = pytest.mark.postgres

CLIENTS = 8
CRASHES = 3


def _accept_until_the_crash(api: Api, cluster: PrivateCluster) -> list[str]:
    """Accept documents from several threads; crash the server once some are in; return
    the ids answered 202."""
    docs = [api.document(title=f"崩溃恢复测试-{i}") for i in range(CLIENTS)]
    accepted: list[str] = []
    stop = threading.Event()

    def client(doc: dict) -> None:  # type: ignore[type-arg]
        c = api.app.test_client()
        while not stop.is_set():
            r = c.post("/api/v1/documents", json=doc, headers=api.headers)
            if r.status_code != 202:
                return  # the server is gone: this request was not accepted
            accepted.append(r.get_json()["id"])

    threads = [threading.Thread(target=client, args=(d,)) for d in docs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(accepted) < 150 and time.monotonic() < deadline:
        time.sleep(0.005)
    cluster.crash()  # mid-stream: groups are being written and committed
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return accepted


@pytest.fixture
def durable_node(tmp_path) -> Iterator[tuple[PrivateCluster, Api]]:
    """A node on a private cluster of its own, which the test may crash and start again."""
    pg_bin = _pg_bin()
    assert pg_bin is not None, "PostgreSQL server binaries not found (tests/run installs them)"
    cluster = PrivateCluster(pg_bin, durable=True)
    url = cluster.start()
    try:
        RecordingAdapter.instances.clear()
        cfg = node_config(tmp_path, url)
        migrate.upgrade(cfg.database_url())
        node = Node(cfg)
        try:
            yield cluster, Api(node)
        finally:
            node.close()
    finally:
        cluster.stop()


def test_documents_answered_202_survive_a_postgresql_crash(durable_node):
    cluster, api = durable_node
    every: list[str] = []
    for _ in range(CRASHES):
        accepted = _accept_until_the_crash(api, cluster)
        assert len(accepted) >= 150  # the crash came mid-stream, not before it
        every += accepted
        cluster.start_again()
        check = Database(api.node.db.url)  # a fresh engine: nothing cached from before the crash
        try:
            with check.sessions() as s:
                found = set(s.scalars(select(Message.id).where(Message.id.in_(every))))
                assert len(found) == len(every), f"{len(every) - len(found)} accepted documents lost"
                deliveries = s.scalar(select(func.count()).select_from(Delivery)
                                      .where(Delivery.message_id.in_(every)))
                outbox = s.scalar(select(func.count()).select_from(OutboxEntry).join(Delivery)
                                  .where(Delivery.message_id.in_(every)))
                audited = s.scalar(select(func.count()).select_from(AuditEntry).where(
                    AuditEntry.action == "message.accept",
                    AuditEntry.object.in_([f"message:{m}" for m in every])))
                assert deliveries == outbox == audited == len(every)
                result = audit.verify(s)
                assert result.ok, result.problem
        finally:
            check.dispose()


def test_accepts_go_on_at_once_after_the_server_drops_the_gateway_s_connections(durable_node):
    """The connection that commits groups of accepts stays open between groups. When the
    server closes it (an administrator's pg_terminate_backend, a restart), the next group
    opens a new one instead of failing: no accept is answered with an error once the server
    is back. The same for a connection kept by a thread that writes in a loop."""
    cluster, api = durable_node
    db = api.node.db
    doc = api.document(title="连接中断后继续收文")
    assert api.post("/api/v1/documents", json=doc).status_code == 202
    db.hold_connection()  # as the delivery worker's claimer and recorder threads do
    with db.begin_core() as c:
        kept = c.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with db.engine.connect() as c:  # every other session of the database, the group's included
        killed = c.exec_driver_sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").scalar()
    assert killed and killed >= 1
    time.sleep(0.2)  # the server's goodbye reaches the client
    statuses = [api.post("/api/v1/documents", json=doc).status_code for _ in range(3)]
    assert statuses == [202, 202, 202]
    with db.begin_core() as c:  # the kept connection was renewed, not failed
        assert c.exec_driver_sql("SELECT pg_backend_pid()").scalar() != kept
    db.release_connection()
    cluster.crash()  # durable: the crash loses nothing that was answered 202
    cluster.start_again()
    statuses = [api.post("/api/v1/documents", json=doc).status_code for _ in range(3)]
    assert statuses == [202, 202, 202]
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 7


def test_while_the_database_is_down_the_api_answers_503_with_retry_after(durable_node):
    """A node whose database cannot be reached says so: 503 `database-unavailable` with Retry-After
    and a detail that tells the caller to send the same request again (not a 500 "internal
    error", which reads as a fault of the request or of the gateway). The retry with the same
    Idempotency-Key, once the database is back, stores the document once."""
    cluster, api = durable_node
    doc = api.document(title="数据库中断时的重试")
    spec = api.client.get("/api/v1/openapi.json").get_json()
    cluster.crash()
    try:
        for method, path, r in (
                ("post", "/api/v1/documents", api.post("/api/v1/documents", json=doc,
                                                       headers={"Idempotency-Key": "db-down-1"})),
                ("get", "/api/v1/documents", api.get("/api/v1/documents"))):
            assert r.status_code == 503, r.get_data(as_text=True)
            _conforms(spec, method, path, r)  # the document lists it, Retry-After included
            problem = r.get_json()
            assert problem["type"] == "urn:egov:gateway:problem:database-unavailable"
            assert int(r.headers["Retry-After"]) >= 1
            assert "same Idempotency-Key" in problem["detail"]
    finally:
        cluster.start_again()
    first = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "db-down-1"})
    again = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "db-down-1"})
    assert (first.status_code, again.status_code) == (202, 202), first.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    with api.node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 1
